"""`make k8s-test`: the chart installed into the current kube context, for real.

    python -m deploy.k8s_test [--values FILE] [--namespace NS] [--keep] [--require]

Installs deploy/helm/ssd300 (values: ci/cpu-values.yaml unless --values) with the Helm SDK,
waits for the rollout, sends a detection request through a `kubectl port-forward` to the
gateway's Service, scales the gateway to 2 replicas and back (a request each time), and
uninstalls (unless --keep). Without a reachable cluster it says why and exits 0 (1 with
--require), so that `make k8s-test` is safe to run anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from deploy.chart import CHART

RELEASE = "ssd300-k8s-test"


def kubectl(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def no_cluster_reason() -> str | None:
    """Why there is no cluster to test on (None: there is one)."""
    if shutil.which("kubectl") is None:
        return "kubectl is not installed"
    try:
        import helm_python  # noqa: F401
    except ImportError:
        return "helm-python-sdk is not installed (make install)"
    context = kubectl("config", "current-context", check=False, timeout=20)
    if context.returncode != 0:
        return f"no current kube context ({context.stderr.strip() or 'kubectl config is empty'})"
    reach = kubectl("version", "--request-timeout=10s", "-o", "json", check=False, timeout=30)
    if reach.returncode != 0 or "serverVersion" not in reach.stdout:
        return f"the cluster of context {context.stdout.strip()!r} cannot be reached"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def port_forward(namespace: str, service: str, port: int):
    local = free_port()
    proc = subprocess.Popen(
        ["kubectl", "-n", namespace, "port-forward", f"svc/{service}", f"{local}:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local), 1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"port-forward to {service} did not open: {proc.stdout.read()}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{local}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def detect(url: str, headers: dict) -> tuple[int, float]:
    import httpx
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/detect", files={"image": ("a.jpg", buf.getvalue(), "image/jpeg")},
                   headers=headers, timeout=120)  # fmt: skip
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/detect: {r.status_code} {r.text[:500]}")
    return r.status_code, round((time.monotonic() - t0) * 1000, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--values", type=Path, default=CHART / "ci" / "cpu-values.yaml")
    p.add_argument("--namespace", default="ssd300-test")
    p.add_argument("--timeout", type=int, default=900, help="seconds for the rollout")
    p.add_argument("--keep", action="store_true", help="leave the release installed")
    p.add_argument("--require", action="store_true", help="fail (1) when there is no cluster")
    args = p.parse_args(argv)
    reason = no_cluster_reason()
    if reason:
        print(f"k8s-test skipped: {reason}. Run it with a kube context (kind, a real cluster): "
              "docs/deployment.md", flush=True)  # fmt: skip
        return 1 if args.require else 0

    import helm_python

    values = yaml.safe_load(args.values.read_text()) or {}
    key = values.get("gateway", {}).get("apiKey", {}).get("value", "")
    headers = {"X-API-Key": key} if key else {}
    figures: dict[str, object] = {"context": kubectl("config", "current-context").stdout.strip()}
    config = helm_python.Config(namespace=args.namespace)
    gateway = f"{RELEASE}-ssd300-gateway"
    try:
        t0 = time.monotonic()
        config.install(str(CHART), RELEASE, values, namespace=args.namespace,
                       create_namespace=True, wait="watcher", timeout=args.timeout)  # fmt: skip
        for component in ("triton", "gateway"):
            kubectl("-n", args.namespace, "rollout", "status", f"deploy/{RELEASE}-ssd300-{component}",
                    f"--timeout={args.timeout}s", timeout=args.timeout + 30)  # fmt: skip
        figures["install to rolled out s"] = round(time.monotonic() - t0, 1)
        with port_forward(args.namespace, gateway, 80) as url:
            figures["request ms (1 replica)"] = detect(url, headers)[1]
        for replicas in (2, 1):
            t1 = time.monotonic()
            kubectl("-n", args.namespace, "scale", f"deploy/{gateway}", f"--replicas={replicas}")
            kubectl("-n", args.namespace, "rollout", "status", f"deploy/{gateway}",
                    "--timeout=300s", timeout=330)  # fmt: skip
            ready = json.loads(kubectl("-n", args.namespace, "get", f"deploy/{gateway}", "-o",
                                       "json").stdout)["status"].get("readyReplicas")  # fmt: skip
            if ready != replicas:
                raise RuntimeError(f"{gateway}: {ready} ready replicas, expected {replicas}")
            figures[f"scale to {replicas} s"] = round(time.monotonic() - t1, 1)
            with port_forward(args.namespace, gateway, 80) as url:
                figures[f"request ms ({replicas} replicas)"] = detect(url, headers)[1]
        print("k8s-test passed:", json.dumps(figures, indent=2))
        return 0
    except Exception as exc:  # reported, with the pods' state
        pods = kubectl("-n", args.namespace, "get", "pods", "-o", "wide", check=False).stdout
        print(f"k8s-test FAILED: {exc}\n{pods}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            with contextlib.suppress(Exception):
                config.uninstall(RELEASE, ignore_not_found=True, wait="watcher", timeout=300)
        config.close()


if __name__ == "__main__":
    sys.exit(main())
