"""The deployment files (deploy/): the image file passes hadolint, the compose file and the Helm chart
name only settings the service accepts, and every object the chart renders passes the Kubernetes
schemas offline (kubernetes-validate) or, for the Prometheus Operator's kinds, promtool and a check
that it selects what the chart serves. No Docker engine or cluster exists here: these are the checks
that can run without one (README, "Running on a cluster")."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

from service.cli import app
from service.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "continual"
HELM = ROOT / ".tools" / "bin" / "helm"
HADOLINT = Path(shutil.which("hadolint") or ROOT / ".venv" / "bin" / "hadolint")
#: The oldest Kubernetes the chart supports (gRPC probes are GA from 1.27) and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CONTINUAL_IMAGE = "continual:0.1.0"


def test_the_image_file_passes_hadolint_and_copies_what_exists() -> None:
    dockerfile = DEPLOY / "Dockerfile"
    linted = subprocess.run([str(HADOLINT), str(dockerfile)], capture_output=True, text=True, check=False)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), flags=re.MULTILINE)
    sources = [source for line in copied for source in line.split()]
    assert sources and all((ROOT / source).exists() for source in sources), sources


def _setting_names(environment: dict[str, str]) -> dict[str, str]:
    """CONTINUAL_* variables as settings fields (the prefix dropped, lower case)."""
    return {
        k.removeprefix("CONTINUAL_").lower(): v for k, v in environment.items() if k.startswith("CONTINUAL_")
    }


def _commands() -> set[str]:
    """The ``continual`` CLI's commands."""
    commands: dict[str, Any] = getattr(typer.main.get_command(app), "commands", {})
    return set(commands)


def test_the_compose_file_runs_the_service_with_settings_it_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = DEPLOY / "compose"
    compose = yaml.safe_load((folder / "docker-compose.yml").read_text())
    services = compose["services"]
    roles = {name: s for name, s in services.items() if s.get("image") == CONTINUAL_IMAGE}
    assert sorted(s["command"][0] for s in roles.values()) == ["serve", "serve", "train"]
    assert {s["command"][0] for s in roles.values()} <= _commands()
    for name, service in roles.items():
        environment = {k: re.sub(r"\$\{[^}]*\}", "a-secret", v) for k, v in service["environment"].items()}
        fields = _setting_names(environment)
        assert set(fields) <= set(Settings.model_fields), (
            f"{name}: unknown settings {set(fields) - set(Settings.model_fields)}"
        )
        with monkeypatch.context() as patched:
            for key, value in environment.items():
                patched.setenv(key, value)
            load_settings()  # raises SettingsError naming the field
    # The broker image is the Kafka version the tests run (deploy/kafka/pom.xml).
    kafka_version = re.search(
        r"<kafka.version>(.+)</kafka.version>", (DEPLOY / "kafka" / "pom.xml").read_text()
    )
    assert kafka_version is not None and services["kafka"]["image"] == f"apache/kafka:{kafka_version[1]}"
    # Every file a service mounts is in the repository; Prometheus scrapes every continual service.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (folder / source).exists(), source
    scraped = yaml.safe_load((folder / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t.split(":")[0] for job in scraped for c in job["static_configs"] for t in c["targets"]}
    assert targets == set(roles)


def _render(*values: str) -> list[dict[str, Any]]:
    rendered = subprocess.run(
        [str(HELM), "template", "continual", str(CHART), *[a for v in values for a in ("--set", v)]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    assert HELM.exists(), f"{HELM} missing: `make tools` builds it (`make test` does)"
    return _render("adminToken.value=a-secret")


def _one(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    return found


def test_every_object_the_chart_renders_passes_the_kubernetes_schemas(objects: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in objects)
    expected = "ConfigMap ConfigMap Secret PersistentVolumeClaim Service Service StatefulSet Deployment"
    expected += " HorizontalPodAutoscaler PodDisruptionBudget ServiceMonitor PrometheusRule"
    assert kinds == sorted(expected.split())
    for manifest in objects:
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # not in Kubernetes' schemas: checked below
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_the_charts_settings_and_environment_are_settings_the_service_accepts(
    objects: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(_one(objects, "ConfigMap", "-settings")["data"]["settings.yaml"])
    secret = _one(objects, "Secret")
    for workload, role in ((_one(objects, "StatefulSet"), "train"), (_one(objects, "Deployment"), "serve")):
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert container["args"] == [role, "--config", "/etc/continual/settings.yaml"]
        assert role in _commands()
        environment = {}
        for variable in container["env"]:
            source = variable.get("valueFrom", {})
            if "secretKeyRef" in source:
                assert source["secretKeyRef"]["name"] == secret["metadata"]["name"]
                assert source["secretKeyRef"]["key"] in secret["data"]
                environment[variable["name"]] = "a-secret"
            else:
                environment[variable["name"]] = variable.get("value", "trainer-0")
        assert set(_setting_names(environment)) <= set(Settings.model_fields)
        with monkeypatch.context() as patched:
            for key, value in environment.items():
                patched.setenv(key, value)
            settings = load_settings(settings_file)  # a bad field raises SettingsError naming it
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == (
            settings.trainer_metrics_port if role == "train" else settings.server_metrics_port
        )
        if role == "serve":
            # Bound beyond loopback with the admin token from the Secret; probed on its gRPC port.
            assert settings.grpc_host == "0.0.0.0" and settings.admin_token is not None
            assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"] == settings.grpc_port
        else:
            # Its pod name is its static group member id.
            (member,) = [v for v in container["env"] if v["name"] == "CONTINUAL_KAFKA_GROUP_INSTANCE_ID"]
            assert member["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_monitoring_objects_scrape_both_roles_and_carry_the_alert_rules(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    monitor = _one(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [o for o in objects if o["kind"] == "Service"]
    assert len(services) == 2
    for service in services:
        assert selector.items() <= service["metadata"]["labels"].items()
        assert "metrics" in {port["name"] for port in service["spec"]["ports"]}
    rules = _one(objects, "PrometheusRule")["spec"]
    assert rules == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    if shutil.which("promtool"):
        path = tmp_path / "rules.yml"
        path.write_text(yaml.safe_dump(rules))
        checked = subprocess.run(
            ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    dashboard = _one(objects, "ConfigMap", "-dashboard")
    assert dashboard["data"]["continual.json"] == (
        DEPLOY / "grafana" / "dashboards" / "continual.json"
    ).read_text().rstrip("\n")
    # The autoscaler and the disruption budget act on the servers.
    deployment = _one(objects, "Deployment")
    assert (
        _one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"]
        == deployment["metadata"]["name"]
    )
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    assert _one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pods.items()


def test_the_chart_refuses_to_render_without_an_admin_token() -> None:
    rendered = subprocess.run(
        [str(HELM), "template", "continual", str(CHART)], capture_output=True, text=True, check=False
    )
    assert rendered.returncode != 0 and "adminToken.value" in rendered.stderr
    # An existing Secret instead: the chart writes none and the servers read that one.
    objects = _render("adminToken.existingSecret=team-token")
    assert not [o for o in objects if o["kind"] == "Secret"]
    (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    (token,) = [v for v in container["env"] if v["name"] == "CONTINUAL_ADMIN_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["name"] == "team-token"


def test_with_a_bucket_the_chart_makes_no_volume_and_passes_the_credentials(tmp_path: Path) -> None:
    objects = _render(
        "adminToken.value=a-secret",
        "registry.url=s3://models/continual",
        "registry.s3.endpoint=http://minio:9000",
        "registry.s3.existingSecret=bucket-keys",
    )
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    for manifest in objects:
        if not manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(manifest, KUBERNETES_VERSIONS[-1], strict=True)
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(_one(objects, "ConfigMap", "-settings")["data"]["settings.yaml"])
    settings = load_settings(settings_file)
    assert (settings.registry_url, settings.registry_s3_endpoint) == (
        "s3://models/continual",
        "http://minio:9000",
    )
    for workload in (_one(objects, "StatefulSet"), _one(objects, "Deployment")):
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        keys = {
            v["name"]: v["valueFrom"]["secretKeyRef"]
            for v in container["env"]
            if v["name"].startswith("AWS_")
        }
        assert keys == {
            "AWS_ACCESS_KEY_ID": {"name": "bucket-keys", "key": "access-key-id"},
            "AWS_SECRET_ACCESS_KEY": {"name": "bucket-keys", "key": "secret-access-key"},
        }
    # Without a Secret the pods use their own identity: no keys in the environment.
    (container,) = _one(
        _render("adminToken.value=a-secret", "registry.url=s3://models/continual"), "Deployment"
    )["spec"]["template"]["spec"]["containers"]
    assert not [v for v in container["env"] if v["name"].startswith("AWS_")]


def test_a_secured_kafka_gets_its_password_and_certificates_from_secrets() -> None:
    objects = _render(
        "adminToken.value=a-secret", "kafka.saslPasswordSecret=kafka-pw", "kafka.tlsSecret=kafka-tls"
    )
    for manifest in objects:
        if not manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(manifest, KUBERNETES_VERSIONS[-1], strict=True)
    pod = _one(objects, "StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (password,) = [v for v in container["env"] if v["name"] == "CONTINUAL_KAFKA_SASL_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": "kafka-pw", "key": "sasl-password"}
    assert {"name": "kafka-tls", "secret": {"secretName": "kafka-tls"}} in pod["volumes"]
    assert {"name": "kafka-tls", "mountPath": "/etc/continual/kafka-tls", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert "kafka_sasl_password" in Settings.model_fields


def test_several_trainer_replicas_split_the_tasks_and_a_shared_strategy_refuses_them(tmp_path: Path) -> None:
    objects = _render("adminToken.value=a-secret", "trainer.replicas=3")
    assert _one(objects, "StatefulSet")["spec"]["replicas"] == 3
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(_one(objects, "ConfigMap", "-settings")["data"]["settings.yaml"])
    settings = load_settings(settings_file)
    assert (settings.kafka_group_trainers, settings.strategy) == ("several", "lora-per-task")
    values = ("adminToken.value=a-secret", "trainer.replicas=2", "settings.strategy=replay")
    rendered = subprocess.run(
        [str(HELM), "template", "continual", str(CHART), *[a for v in values for a in ("--set", v)]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert rendered.returncode != 0 and "trainer.replicas: 2 trainers" in rendered.stderr
    assert len(_render("adminToken.value=a-secret", "settings.strategy=replay")) == len(objects)
