"""The chart's pod specs run for real by ``podman kube play`` (Debian's podman 4.3), with the
project's images (the ones the compose tests build, copied from Docker's store).

What podman plays: Deployments (images, args, env, volumes, security context, limits). What it
ignores: Services, HPA, PDB, NetworkPolicy, readiness/startup probes, so the tests poll
readiness themselves and give the gateway Triton's pod address (``gateway.tritonUrl``) instead
of the headless Service's name. The repository's claim is a podman volume of the claim's name,
bound to a folder of this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from tests.deploy.docker_stack import run

# runc (crun refuses hybrid cgroup hierarchies), no systemd, and rlimits written down (runc
# cannot raise them in some sandboxes)
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


class PodmanUnavailable(RuntimeError):
    """No podman here and none can be installed."""


def ensure_podman() -> dict[str, str]:
    """podman installed (root on Debian); the environment its commands run with."""
    if shutil.which("podman") is None or shutil.which("catatonit") is None:
        if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
            raise PodmanUnavailable(
                "podman is not installed, and installing it needs root on Debian"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        # catatonit named: apt skips it where tini exists, and the pause image needs it
        run(["apt-get", "install", "-y", "-qq", "podman", "catatonit"], env=env)
    conf = Path(tempfile.gettempdir()) / "ssd300-containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(env: dict, *args: str, timeout: float = 600, check: bool = True, **kw):
    return run(["podman", *args], timeout=timeout, check=check, env=env, **kw)


def copy_image(env: dict, tag: str) -> float:
    """``docker save | podman load`` unless podman has the same image already; seconds."""
    docker_id = run(["docker", "image", "inspect", "-f", "{{.Id}}", tag]).stdout.strip()
    mine = podman(env, "image", "inspect", "-f", "{{.Id}}", tag, check=False).stdout.strip()
    if mine and docker_id.endswith(mine.removeprefix("sha256:")):
        return 0.0
    t0 = time.monotonic()
    save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
    proc = subprocess.run(["podman", "load"], stdin=save.stdout, capture_output=True, text=True,
                          env=env, timeout=900)  # fmt: skip
    save.wait()
    if proc.returncode != 0 or save.returncode != 0:
        raise RuntimeError(f"docker save {tag} | podman load failed: {proc.stderr[-2000:]}")
    return round(time.monotonic() - t0, 1)


class Played:
    """One manifest file played; ``down`` removes its pods."""

    def __init__(self, env: dict, objects: list[dict], folder: Path, name: str) -> None:
        self.env = env
        self.file = folder / f"{name}.yaml"
        self.file.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        self.pods: list[str] = []

    def play(self) -> Played:
        out = podman(self.env, "kube", "play", str(self.file)).stdout
        self.pods = [p for p in out.split("Pod:\n", 1)[-1].split("Containers:")[0].split() if p]
        return self

    def containers(self) -> list[dict]:
        ids = podman(self.env, "ps", "-a", "-q", "--no-trunc", "--filter",
                     f"pod={self.pods[0]}").stdout.split()  # fmt: skip
        infos = json.loads(podman(self.env, "inspect", *ids).stdout)
        return [i for i in infos if not i.get("IsInfra")]

    def container(self, name: str) -> dict:
        return next(c for c in self.containers() if c["Name"].endswith(f"-{name}"))

    def ip(self) -> str:
        infra = json.loads(podman(self.env, "pod", "inspect", self.pods[0]).stdout)
        infra = infra[0] if isinstance(infra, list) else infra
        info = json.loads(podman(self.env, "inspect", infra["InfraContainerID"]).stdout)[0]
        nets = info["NetworkSettings"]["Networks"]
        return next(iter(nets.values()))["IPAddress"]

    def logs(self) -> str:
        out = []
        for c in self.containers():
            proc = podman(self.env, "logs", "--tail", "60", c["Id"], check=False)
            out.append(f"--- {c['Name']}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return "\n".join(out)

    def down(self) -> None:
        podman(self.env, "kube", "down", str(self.file), check=False)
