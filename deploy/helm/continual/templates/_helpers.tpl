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

{{/* What both roles' pods share: the image, the settings file, the registry volume. */}}
{{- define "continual.podCommon" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  fsGroup: 10001
volumes:
  - name: settings
    configMap:
      name: {{ include "continual.name" . }}-settings
  - name: registry
    persistentVolumeClaim:
      claimName: {{ include "continual.name" . }}-registry
{{- end -}}

{{- define "continual.mounts" -}}
- name: settings
  mountPath: /etc/continual
  readOnly: true
- name: registry
  mountPath: /data
{{- end -}}
