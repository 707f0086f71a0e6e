{{- define "continual.name" -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "continual.labels" -}}
app.kubernetes.io/name: continual
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "continual.selector" -}}
app.kubernetes.io/name: continual
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "continual.secretName" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin" (include "continual.name" .)) -}}
{{- end -}}

{{/* What both roles' pods share: the image, the settings file, the registry volume (scratch space
when the registry is in a bucket). */}}
{{- define "continual.podCommon" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  fsGroup: 10001
volumes:
  - name: settings
    configMap:
      name: {{ include "continual.name" . }}-settings
  - name: data
    {{- if .Values.registry.url }}
    emptyDir: {}
    {{- else }}
    persistentVolumeClaim:
      claimName: {{ include "continual.name" . }}-registry
    {{- end }}
  {{- with .Values.kafka.tlsSecret }}
  - name: kafka-tls
    secret:
      secretName: {{ . }}
  {{- end }}
{{- end -}}

{{/* The bucket's credentials, when a Secret holds them (else the pod's own identity). */}}
{{- define "continual.s3Env" -}}
{{- if and .Values.registry.url .Values.registry.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.registry.s3.existingSecret }}
      key: access-key-id
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.registry.s3.existingSecret }}
      key: secret-access-key
{{- end }}
{{- end -}}

{{- define "continual.mounts" -}}
- name: settings
  mountPath: /etc/continual
  readOnly: true
- name: data
  mountPath: /data
{{- if .Values.kafka.tlsSecret }}
- name: kafka-tls
  mountPath: /etc/continual/kafka-tls
  readOnly: true
{{- end }}
{{- end -}}
