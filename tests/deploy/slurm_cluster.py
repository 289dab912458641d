"""A real single-host Slurm cluster (Debian's slurm-wlm and munge) with all of its state in a
temporary folder: munged, slurmctld and slurmd started as root, stopped by the PIDs they write.

Installs the packages where they are missing (root on Debian); ``SlurmUnavailable`` says why it
cannot run elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from loadtest.processes import free_port

PACKAGES = ["slurm-wlm", "munge"]


class SlurmUnavailable(RuntimeError):
    """No Slurm here and none can be installed."""


def ensure_slurm() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
        raise SlurmUnavailable("Slurm is not installed, and installing it needs root on Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")


CONF = """\
ClusterName=ssd300test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
MinJobAge=600
KillWait=60
InactiveLimit=0
Waittime=0
NodeName=localhost CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd on this host; ``env`` points the clients at it."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.conf = state / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.munge_socket = state / "munge" / "munge.socket.2"

    def start(self) -> SlurmCluster:
        ensure_slurm()
        for sub in ("ctld", "d", "munge"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            CONF.format(ctld_port=free_port(), d_port=free_port(), state=self.state,
                        cpus=os.cpu_count() or 2)
        )  # fmt: skip
        shutil.chown(self.state / "munge", "munge", "munge")
        self._run(["munged", "--socket", str(self.munge_socket),
                   "--pid-file", str(self.state / "munge" / "munged.pid"),
                   "--log-file", str(self.state / "munge" / "munged.log"), "--force"],
                  user="munge")  # fmt: skip
        # munged's socket is not at its default path; cred_expire is also how long a requeued
        # job waits before it may start again (Slurm's default 120 s; 10 here, to test quickly)
        with self.conf.open("a") as f:
            f.write(f"AuthInfo=socket={self.munge_socket},cred_expire=10\n")
        self._run(["slurmctld", "-f", str(self.conf)])
        self._run(["slurmd", "-f", str(self.conf)])
        deadline = time.monotonic() + 30
        while "idle" not in self.cli("sinfo", "-h", "-o", "%T", check=False):
            if time.monotonic() > deadline:
                raise SlurmUnavailable("the node did not become idle:\n" + self.logs())
            time.sleep(0.5)
        return self

    def _run(self, cmd: list[str], user: str | None = None) -> None:
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}")

    def cli(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def submit(self, *args: str, env: dict | None = None) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60,
            env={**self.env, **(env or {})},
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's fields of a job (JobState, RestartCnt, ExitCode, ...)."""
        text = self.cli("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')}:\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in (self.state / "slurmctld.log", self.state / "slurmd.log")
            if p.exists()
        )

    def stop(self) -> None:
        for pidfile in (self.state / "slurmd.pid", self.state / "slurmctld.pid",
                        self.state / "munge" / "munged.pid"):  # fmt: skip
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.2)
