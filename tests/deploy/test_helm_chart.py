"""deploy/helm/ssd300 rendered by a real Helm engine for a matrix of values, every object
validated against the Kubernetes API schemas (strict: no unknown field) of the oldest release
the chart supports and the newest one packaged; the security, probe, drain and network settings
asserted on the rendered objects; values.schema.json refusing bad values at install. The custom
resources (PodMonitor, ScaledObject, PyTorchJob) have no schema there: their shape is asserted.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml

from deploy.chart import by_kind, one, render

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

pytestmark = pytest.mark.kube
ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
FIGURES_FILE = ROOT / "loadtest" / "reports" / "helm_figures.json"
CUSTOM = {"PodMonitor", "ScaledObject", "PyTorchJob"}

CASES = {
    "defaults (GPU, PVC + export Job)": {},
    "CPU, HPA on, Ingress on, PodMonitor": {
        "model": {"name": "ssd300_python"},
        "triton": {"gpu": False},
        "autoscaling": {"gateway": {"enabled": True, "metric": "inflight"},
                        "triton": {"enabled": True}},
        "ingress": {"enabled": True, "className": "nginx",
                    "tls": [{"hosts": ["ssd300.example.com"], "secretName": "ssd300-tls"}]},
        "metrics": {"podMonitor": {"enabled": True}},
        "gateway": {"apiKey": {"value": "s3cret"}},
    },
    "S3 repository, KEDA, explicit existing key": {
        "model": {"repository": {"kind": "s3", "s3": {
            "bucketPath": "models-bucket/ssd300", "credentialsSecret": "s3-credentials",
            "endpoint": "https://minio.storage:9000"}}},
        "export": {"enabled": False},
        "autoscaling": {"triton": {"enabled": True, "engine": "keda"},
                        "gateway": {"enabled": True}},
        "gateway": {"apiKey": {"existingSecret": "ssd300-key"}},
    },
    "GPU, HPA off, Ingress off, no policy, no PDB, existing claim": {
        "model": {"repository": {"pvc": {"existingClaim": "models"}}},
        "networkPolicy": {"enabled": False},
        "triton": {"pdb": {"enabled": False}, "replicas": 3, "gpusPerPod": 2},
        "gateway": {"pdb": {"enabled": False}, "metricsPort": 0},
    },
    "explicit model control, one Triton": {
        "triton": {"modelControl": "explicit", "replicas": 1},
    },
}  # fmt: skip
CASES["ci/cpu-values.yaml (make k8s-test)"] = yaml.safe_load(
    (ROOT / "deploy/helm/ssd300/ci/cpu-values.yaml").read_text()
)
RENDERED = {name: render(values) for name, values in CASES.items()}


def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict, name: str | None = None) -> dict:
    containers = pod(deployment)["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def env(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_every_object_is_valid_for_the_kubernetes_api(case, kube):
    for obj in RENDERED[case]:
        if obj["kind"] in CUSTOM:
            continue
        try:
            kubernetes_validate.validate(obj, kube, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} ({case}, {kube}): {exc}")


def test_figures_objects_per_case():
    table = {case: dict(Counter(o["kind"] for o in objs)) for case, objs in RENDERED.items()}
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    FIGURES_FILE.write_text(json.dumps(table, indent=2))
    print("\nrendered objects per values case:", json.dumps(table, indent=2))
    assert table["defaults (GPU, PVC + export Job)"] == {
        "Deployment": 2, "Service": 3, "PodDisruptionBudget": 2, "PersistentVolumeClaim": 1,
        "Job": 1, "NetworkPolicy": 2,
    }  # fmt: skip
    cpu = table["CPU, HPA on, Ingress on, PodMonitor"]
    assert cpu["HorizontalPodAutoscaler"] == 2 and cpu["Ingress"] == 1
    assert cpu["PodMonitor"] == 2 and cpu["Secret"] == 1
    s3 = table["S3 repository, KEDA, explicit existing key"]
    assert s3["ScaledObject"] == 1 and s3["HorizontalPodAutoscaler"] == 1 and s3["ConfigMap"] == 1
    assert "Job" not in s3 and "PersistentVolumeClaim" not in s3 and "Secret" not in s3
    bare = table["GPU, HPA off, Ingress off, no policy, no PDB, existing claim"]
    assert {"NetworkPolicy", "PodDisruptionBudget", "PersistentVolumeClaim"}.isdisjoint(bare)


@pytest.mark.parametrize("case", CASES)
def test_pods_are_locked_down(case):
    objects = RENDERED[case]
    workloads = [*by_kind(objects, "Deployment"), *by_kind(objects, "Job")]
    for w in workloads:
        spec = pod(w)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]
            assert c["resources"]["requests"], c["name"]
            assert c["imagePullPolicy"] == "IfNotPresent"
    gateway = one(objects, "Deployment", "gateway")
    assert pod(gateway)["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize("case", CASES)
def test_probes_drain_and_wiring(case):
    objects, values = RENDERED[case], CASES[case]
    gateway, triton = one(objects, "Deployment", "gateway"), one(objects, "Deployment", "triton")
    g = container(gateway, "gateway")
    assert g["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert g["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert g["startupProbe"]["httpGet"]["path"] == "/livez"
    # SIGTERM after the preStop wait; then up to the request deadline (30 s) to finish
    sleep = int(g["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod(gateway)["terminationGracePeriodSeconds"] > sleep + 30
    e = env(g)
    assert e["SSD_BACKEND"] == "triton"
    triton_name = triton["metadata"]["name"]
    assert e["SSD_TRITON_URL"] == f"dns:///{triton_name}-pods.ssd300.svc:8001"
    headless = next(s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") == "None")
    assert headless["metadata"]["name"] == f"{triton_name}-pods"
    assert headless["spec"]["selector"] == triton["spec"]["selector"]["matchLabels"]
    metrics_port = values.get("gateway", {}).get("metricsPort", 9100)
    if metrics_port:  # 0: /metrics stays on the API's port (the setting must then be unset)
        assert e["SSD_METRICS_PORT"] == str(metrics_port)
    else:
        assert "SSD_METRICS_PORT" not in e
    control = values.get("triton", {}).get("modelControl", "poll")
    assert e["SSD_TRITON_MODEL_CONTROL"] == control
    assert e["SSD_MODEL_NAME"] == values.get("model", {}).get("name", "ssd300_onnx")
    key = values.get("gateway", {}).get("apiKey", {})
    if key:
        secret = key.get("existingSecret") or "demo-ssd300-api-key"
        assert e["SSD_API_KEY"] == {"secretKeyRef": {"name": secret, "key": "api-key"}}
    else:
        assert "SSD_API_KEY" not in e

    t = container(triton)
    assert t["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert t["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    model = e["SSD_MODEL_NAME"]
    assert t["readinessProbe"]["httpGet"]["path"] == f"/v2/models/{model}/ready"
    assert {p["containerPort"] for p in t["ports"]} == {8000, 8001, 8002}
    # longer than a request's deadline at Triton (5 s) by a margin
    assert pod(triton)["terminationGracePeriodSeconds"] >= 30
    gpu = values.get("triton", {}).get("gpu", True)
    limits = t["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == gpu
    if gpu:
        n = values.get("triton", {}).get("gpusPerPod", 1)
        assert limits["nvidia.com/gpu"] == t["resources"]["requests"]["nvidia.com/gpu"] == n
    args = t["args"]
    if control == "poll":
        assert "--model-control-mode=poll" in args and not any("--load-model" in a for a in args)
    else:
        assert f"--load-model={model}" in args
    s3 = values.get("model", {}).get("repository", {}).get("kind") == "s3"
    if s3:
        assert "--model-repository=s3://https://minio.storage:9000/models-bucket/ssd300" in args
        assert t["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        sync = container(gateway, "models-sync")
        assert env(sync)["SOURCE"] == "s3://models-bucket/ssd300"
        assert {v["name"] for v in sync["volumeMounts"]} >= {"models", "sync"}
    else:
        assert "--model-repository=/models" in args
        claim = (
            values.get("model", {})
            .get("repository", {})
            .get("pvc", {})
            .get("existingClaim", "demo-ssd300-models")
        )
        for w in (gateway, triton):  # Triton and the gateways only read the repository
            vol = next(v for v in pod(w)["volumes"] if v["name"] == "models")
            assert vol["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
            mount = next(m for m in container(w)["volumeMounts"] if m["name"] == "models")
            assert mount["readOnly"] is True
    for svc in by_kind(objects, "Service"):
        assert svc["spec"]["type"] == "ClusterIP"  # Triton's never leaves the cluster


def test_only_gateway_pods_reach_triton():
    objects = RENDERED["defaults (GPU, PVC + export Job)"]
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objects, "NetworkPolicy")}
    triton = policies["demo-ssd300-triton"]
    gateway_labels = one(objects, "Deployment", "gateway")["spec"]["selector"]["matchLabels"]
    assert triton["policyTypes"] == ["Ingress"]
    grpc_rule, metrics_rule = triton["ingress"]
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": gateway_labels}}]
    assert {p["port"] for p in grpc_rule["ports"]} == {8000, 8001}
    assert [p["port"] for p in metrics_rule["ports"]] == [8002]
    assert "podSelector" not in metrics_rule["from"][0]  # the monitoring namespace only


def test_export_job_writes_the_served_model_into_the_claim():
    objects = RENDERED["defaults (GPU, PVC + export Job)"]
    job = one(objects, "Job")
    c = container(job)
    assert c["command"] == ["python", "-m", "training.export"]
    assert "--formats=onnx" in c["args"] and "--ensure" in c["args"]
    assert "--checkpoint=nvidia" in c["args"] and "--cpu" not in c["args"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert not mount.get("readOnly")
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert job["metadata"]["name"].endswith("-export-1")  # one per revision
    cpu = one(RENDERED["CPU, HPA on, Ingress on, PodMonitor"], "Job")
    assert {"--formats=python", "--cpu"} <= set(container(cpu)["args"])


def test_autoscalers():
    objects = RENDERED["CPU, HPA on, Ingress on, PodMonitor"]
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h["spec"] for h in
            by_kind(objects, "HorizontalPodAutoscaler")}  # fmt: skip
    gateway, triton = hpas["demo-ssd300-gateway"], hpas["demo-ssd300-triton"]
    assert gateway["metrics"][0]["pods"]["metric"]["name"] == "ssd_in_flight_requests"
    assert triton["metrics"][0]["pods"]["metric"]["name"] == "triton_queue_compute_ratio"
    for d in by_kind(objects, "Deployment"):  # the HPA owns the replica count
        assert "replicas" not in d["spec"]
    adapter = yaml.safe_load((ROOT / "deploy/helm/prometheus-adapter-values.yaml").read_text())
    rule = next(r for r in adapter["rules"]["custom"]
                if r["name"]["as"] == "triton_queue_compute_ratio")  # fmt: skip
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert "nv_inference_compute_infer_duration_us" in rule["metricsQuery"]
    assert any(r["name"]["as"] == "ssd_in_flight_requests" for r in adapter["rules"]["custom"])
    keda = one(RENDERED["S3 repository, KEDA, explicit existing key"], "ScaledObject")
    assert keda["apiVersion"] == "keda.sh/v1alpha1"
    assert keda["spec"]["scaleTargetRef"]["name"] == "demo-ssd300-triton"
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) == 0.5
    assert "nv_inference_queue_duration_us" in trigger["metadata"]["query"]
    for monitor in by_kind(objects, "PodMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


BAD = {
    "replicas as text": ({"triton": {"replicas": "two"}}, "/triton/replicas"),
    "unknown key": ({"gateway": {"replica": 3}}, "'replica' not allowed"),
    "unknown model": ({"model": {"name": "yolo"}}, "/model/name"),
    "s3 without a bucket": ({"model": {"repository": {"kind": "s3"}}, "export": {"enabled": False}},
                            "/model/repository/s3/bucketPath"),
    "s3 with the export Job": ({"model": {"repository": {"kind": "s3", "s3": {
        "bucketPath": "b/p"}}}}, "/export/enabled"),
    "s3 with explicit control": ({"model": {"repository": {"kind": "s3", "s3": {
        "bucketPath": "b/p"}}}, "export": {"enabled": False},
        "triton": {"modelControl": "explicit"}}, "/triton/modelControl"),
    "explicit control, 3 Tritons": ({"triton": {"modelControl": "explicit", "replicas": 3}},
                                    "/triton/replicas"),
    "a non-SSD env name": ({"gateway": {"env": {"PATH": "/x"}}}, "PATH"),
    "a port out of range": ({"gateway": {"port": 70000}}, "/gateway/port"),
    "pull policy": ({"gateway": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),
    "INT8 with the export Job": ({"model": {"name": "ssd300_onnx_int8"}}, "/export/enabled"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_schema_refuses_bad_values(case):
    values, where = BAD[case]
    with pytest.raises(helm_python.HelmValuesError) as err:
        render(values)
    assert where in str(err.value), str(err.value)


def test_helm_lint_is_clean():
    report = helm_python.lint(str(ROOT / "deploy/helm/ssd300"), strict=True, kube_version="v1.30.0")
    assert not report["errors"], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


def test_pytorchjob_runs_the_recipe():
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/pytorchjob.yaml").read_text()))
    (job,) = [d for d in docs if d and d["kind"] == "PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    assert job["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    for role, spec in specs.items():
        assert spec["restartPolicy"] == "OnFailure", role
        template = spec["template"]["spec"]
        (c,) = template["containers"]
        assert c["name"] == "pytorch", role  # the container the operator configures
        assert c["command"][:2] == ["bash", "-c"]
        script = c["command"][2]
        assert (
            f"torchrun --nproc_per_node={job['spec']['nprocPerNode']} training/train.py" in script
        )
        # resumes after a restart: the recipe's flags plus --checkpoint once one was written
        assert '[ -f "$save/checkpoints.json" ]' in script and "$resume" in script
        assert "--batch-size 128 --learning-rate 2.7e-3 --warmup 1200 --amp" in script
        assert c["resources"]["limits"]["nvidia.com/gpu"] == int(job["spec"]["nprocPerNode"])
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/coco", "/checkpoints", "/dev/shm"} <= mounts
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template},
            KUBE_VERSIONS[0], strict=True,
        )  # fmt: skip


def test_k8s_test_without_a_cluster_says_why(tmp_path):
    """make k8s-test where there is no cluster: the reason, exit 0 (1 with --require)."""
    import subprocess
    import sys

    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none")}
    for flags, code in (([], 0), (["--require"], 1)):
        proc = subprocess.run([sys.executable, "-m", "deploy.k8s_test", *flags], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == code, proc.stdout + proc.stderr
        assert "k8s-test skipped: " in proc.stdout
        assert "kubectl is not installed" in proc.stdout or "kube context" in proc.stdout


@pytest.mark.parametrize("case", CASES)
def test_the_gateway_accepts_its_rendered_settings(case, monkeypatch):
    """Every SSD_ variable the chart sets is one the gateway's Settings reads and accepts (the
    API key, from a Secret, stands in as a literal)."""
    from service.settings import Settings

    g = container(one(RENDERED[case], "Deployment", "gateway"), "gateway")
    names = set(Settings.model_fields)
    for name, value in env(g).items():
        assert name.startswith("SSD_") and name[4:].lower() in names, name
        monkeypatch.setenv(name, value if isinstance(value, str) else "a-key-from-the-secret")
    settings = Settings()
    assert settings.backend == "triton" and settings.model_repository.as_posix() == "/models"
