"""The Helm chart with the real helm binary: lint, render, validate every manifest against the
Kubernetes schemas (kubernetes-validate, strict), check that the parts agree, that bad values
are refused, and that every PDSERVE_* variable it sets is one `pdserve <role>` reads."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).parents[2]
CHART = ROOT / "helm" / "pdserve"
VALUES = [None, *sorted(str(p) for p in (CHART / "ci").glob("*-values.yaml"))]
K8S_VERSION = "1.33.0"


def helm() -> str:
    found = shutil.which("helm") or str(Path(sys.executable).parent / "helm")
    assert Path(found).exists(), "helm not found: `make test` installs it (scripts/get_helm.sh)"
    return found


def run_helm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120)


def render(values: str | None = None, *sets: str) -> list[dict]:
    args = ["template", "rel", str(CHART), *(["-f", values] if values else [])]
    for s in sets:
        args += ["--set", s]
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(docs, kind) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env(deployment) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


@pytest.mark.parametrize("values", VALUES, ids=lambda v: Path(v).name if v else "defaults")
def test_lint_strict_and_every_manifest_validates(values):
    result = run_helm("lint", "--strict", str(CHART), *(["-f", values] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr
    docs = render(values)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):  # a CRD: no upstream schema
            assert (doc["kind"] == "ServiceMonitor" and doc["spec"]["endpoints"] or
                    doc["kind"] == "PodMonitor" and doc["spec"]["podMetricsEndpoints"])
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    names = [f"{d['kind']}/{d['metadata']['name']}" for d in docs]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("values", VALUES, ids=lambda v: Path(v).name if v else "defaults")
def test_ports_probes_and_redis_agree(values):
    docs = render(values)
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    for name, service in services.items():  # each Service port names a port of its pods
        pods = [d for d in deployments.values() if d["spec"]["selector"]["matchLabels"].items()
                <= service["spec"]["selector"].items()]
        assert len(pods) == 1, name
        ports = {p["name"]: p["containerPort"] for p in container(pods[0])["ports"]}
        for p in service["spec"]["ports"]:
            assert ports.get(p["targetPort"]) == p["port"], (name, p)
    config = by_kind(docs, "ConfigMap")["rel-pdserve"]["data"]
    redis_url = config["PDSERVE_REDIS_URL"]
    if "rel-pdserve-redis" in services:
        assert redis_url == f"redis://rel-pdserve-redis:{services['rel-pdserve-redis']['spec']['ports'][0]['port']}/0"
    else:
        assert redis_url.startswith("redis://") and "rel-pdserve-redis" not in deployments
    for name, deployment in deployments.items():
        c = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in (c.get("readinessProbe"), c.get("startupProbe"), c.get("livenessProbe")):
            if probe and "grpc" in probe:
                assert probe["grpc"]["port"] == ports["grpc"]
            if probe and probe.get("exec", {}).get("command", [""])[0] == "pdserve":  # with TLS
                assert probe["exec"]["command"] == ["pdserve", "health", f"127.0.0.1:{ports['grpc']}"]
            if probe and "httpGet" in probe:
                assert probe["httpGet"]["path"] == "/health" and probe["httpGet"]["port"] == "http"
        if name.endswith(("router", "prefill", "decode")):  # they all find each other through Redis
            assert env(deployment)["PDSERVE_REDIS_URL"]["configMapKeyRef"]["key"] == "PDSERVE_REDIS_URL"
            assert env(deployment)["PDSERVE_PORT"] == str(ports["grpc"])
    gateway = deployments.get("rel-pdserve-gateway")
    if gateway:
        router_port = services["rel-pdserve-router"]["spec"]["ports"][0]["port"]
        assert env(gateway)["PDSERVE_ROUTER"] == f"rel-pdserve-router:{router_port}"


def test_gpus_are_requested_only_when_asked():
    def gpus(docs):
        return {n: container(d)["resources"].get("limits", {}).get("nvidia.com/gpu")
                for n, d in by_kind(docs, "Deployment").items()}

    assert set(gpus(render()).values()) == {None}
    on_gpu = gpus(render(str(CHART / "ci" / "gpu-values.yaml")))
    assert on_gpu.pop("rel-pdserve-prefill") == 1 and on_gpu.pop("rel-pdserve-decode") == 1
    assert set(on_gpu.values()) == {None}
    assert env(by_kind(render(None, "decode.gpu=true"), "Deployment")["rel-pdserve-decode"])["PDSERVE_DEVICE"] == "cuda"


def test_decode_pods_ask_for_the_values_connector():
    for values, connector in ((None, "tcp"), (str(CHART / "ci" / "gpu-nccl-values.yaml"), "nccl")):
        deployments = by_kind(render(values), "Deployment")
        assert env(deployments["rel-pdserve-decode"])["PDSERVE_KV_CONNECTOR"] == connector
        assert "PDSERVE_KV_CONNECTOR" not in env(deployments["rel-pdserve-prefill"])  # it speaks both


def test_aggregated_serving_has_no_prefill_pods_and_tells_the_router():
    deployments = by_kind(render(None, "prefill.replicas=0", "disaggregation=never"), "Deployment")
    assert deployments["rel-pdserve-prefill"]["spec"]["replicas"] == 0
    assert env(deployments["rel-pdserve-router"])["PDSERVE_DISAGGREGATION"] == "never"
    assert env(by_kind(render(), "Deployment")["rel-pdserve-router"])["PDSERVE_DISAGGREGATION"] == "auto"


def test_the_router_waits_as_long_as_the_values_say_for_a_decode_node_to_come_back():
    assert env(by_kind(render(), "Deployment")["rel-pdserve-router"])["PDSERVE_RESUME_WAIT_S"] == "60"
    router = by_kind(render(None, "router.resumeWaitSeconds=300"), "Deployment")["rel-pdserve-router"]
    assert env(router)["PDSERVE_RESUME_WAIT_S"] == "300"


def test_tls_reaches_every_pdserve_pod_and_its_probes():
    docs = render(str(CHART / "ci" / "tls-values.yaml"))
    for name, deployment in by_kind(docs, "Deployment").items():
        c, pod = container(deployment), deployment["spec"]["template"]["spec"]
        if c["image"].startswith("redis"):
            continue
        variables = env(deployment)
        assert variables["PDSERVE_TLS_CERT"] == "/etc/pdserve/tls/tls.crt", name
        assert variables["PDSERVE_TLS_SERVER_NAME"] == "pdserve.internal" and variables["PDSERVE_TLS_KV"] == "off"
        assert {"name": "tls", "mountPath": "/etc/pdserve/tls", "readOnly": True} in c["volumeMounts"], name
        assert {"name": "tls", "secret": {"secretName": "pdserve-tls"}} in pod["volumes"], name
        for probe in (c.get("readinessProbe"), c.get("startupProbe")):
            assert probe is None or "grpc" not in probe, name  # Kubernetes' gRPC probe speaks no TLS
    gateway = container(by_kind(docs, "Deployment")["rel-pdserve-gateway"])
    assert gateway["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    endpoints = (next(iter(by_kind(docs, "ServiceMonitor").values()))["spec"]["endpoints"] +
                 next(iter(by_kind(docs, "PodMonitor").values()))["spec"]["podMetricsEndpoints"])
    assert {e["port"] for e in endpoints} == {"metrics", "http"}
    for endpoint in endpoints:
        assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["ca"]["secret"]["name"] == "pdserve-tls"
    plain = by_kind(render(), "Deployment")
    assert not any(e["name"].startswith("PDSERVE_TLS") for d in plain.values() for e in container(d).get("env", []))


def test_the_dashboard_queries_only_metrics_that_some_role_exports():
    """Every metric a panel's query names is one that a pdserve process exports (a histogram's
    series by its family), and the ConfigMap carries the JSON as it is in dashboards/."""
    from pdserve.service import metrics

    exported = set().union(*(metrics.family_names(role) for role in metrics.ROLES))
    dashboard = json.loads((CHART / "dashboards" / "pdserve.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"pdserve_\w+", target["expr"])}
    assert queried and queried <= exported, queried - exported
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for topic in ("first token", "Inter-token", "End-to-end", "Tokens per second", "KV cache usage",
                  "Prefix cache hit rate", "KV transfer", "Routing", "Queues"):
        assert topic in titles, topic
    [config_map] = [d for d in render(None, "dashboard.enabled=true") if d["metadata"]["name"] == "rel-pdserve-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["pdserve.json"]) == dashboard


def test_pods_run_as_non_root_with_a_read_only_root_filesystem():
    for name, d in by_kind(render(), "Deployment").items():
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"], name
        assert container(d)["securityContext"]["readOnlyRootFilesystem"], name
        assert container(d)["securityContext"]["allowPrivilegeEscalation"] is False, name


@pytest.mark.parametrize("setting, message", [
    ("prefill.replicas=-1", "/prefill/replicas"), ("decode.replicas=-3", "/decode/replicas"),
    ("kvConnector=rdma", "/kvConnector"), ("model.name=", "/model/name"),
    ("redis.enabled=false", "/redis/externalUrl"), ("routingPolicy=random", "/routingPolicy"),
    ("disaggregation=sometimes", "/disaggregation"),
    ("router.port=70000", "/router/port"), ("router.resumeWaitSeconds=-1", "/router/resumeWaitSeconds"), ("prefill.extraEnv.FOO=1", "'FOO' does not match"),
    ("tls.existingSecret=mine", "/tls/serverName"),
])
def test_bad_values_are_refused_by_the_schema(setting, message):
    result = run_helm("template", "rel", str(CHART), "--set", setting)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_every_variable_the_chart_sets_is_one_pdserve_reads():
    docs = render(str(CHART / "ci" / "external-redis-values.yaml"), "prefill.extraEnv.PDSERVE_MAX_NUM_BATCHED_TOKENS=4096",
                  "tracing.otlpEndpoint=collector:4317", "tls.existingSecret=tls", "tls.serverName=pdserve.internal")
    for name, deployment in by_kind(docs, "Deployment").items():
        c = container(deployment)
        if c["image"].startswith("redis"):
            continue
        role = c["args"][0]
        help_text = subprocess.run([sys.executable, "-m", "pdserve.cli", role, "--help"], capture_output=True,
                                   text=True, timeout=60, cwd=ROOT).stdout
        help_text = " ".join(help_text.split())  # argparse wraps lines
        flags = [c["args"][i] for i in range(1, len(c["args"])) if c["args"][i].startswith("--")]
        for variable in [e["name"] for e in c["env"] if e["name"].startswith("PDSERVE_")]:
            assert f"env {variable};" in help_text, f"{name}: pdserve {role} does not read {variable}"
        for flag in flags:
            assert flag in help_text, f"{name}: pdserve {role} has no {flag}"


def test_the_image_runs_as_the_user_the_chart_expects():
    dockerfile = (ROOT / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"USER {values['podSecurityContext']['runAsUser']}" in dockerfile
    assert 'ENTRYPOINT ["pdserve"]' in dockerfile
    assert "COPY pdserve pdserve" in dockerfile  # the one package
    assert "-r requirements/runtime.lock" in dockerfile  # installed from the lock
