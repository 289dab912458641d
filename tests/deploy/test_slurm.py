"""recipes/slurm/ssd300.sbatch on a real single-host Slurm (slurmctld + slurmd + munged from
Debian's packages, started here): 2 CPU processes train the synthetic data to a checkpoint, and
`scontrol requeue` of a running job brings it back where it stopped.

Skipped where Slurm cannot be had (not root on Debian), except in CI, where that fails.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.deploy.docker_stack import ROOT
from tests.deploy.slurm_cluster import SlurmCluster, SlurmUnavailable
from training.checkpoint import read_checkpoint
from training.synthetic import generate

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
RECIPE = ROOT / "recipes" / "slurm" / "ssd300.sbatch"
FIGURES_FILE = ROOT / "loadtest" / "reports" / "slurm_figures.json"
FIGURES: dict[str, float | str] = {}
# the recipe's flags first; these win (argparse keeps the last): CPU, small, every step logged
SMALL = ["--batch-size", "2", "--no-amp", "--data-backend", "torch", "--device", "cpu",
         "--backbone", "resnet18", "--backbone-weights", "none", "--num-workers", "1",
         "--log-interval", "1", "--warmup", "2", "--seed", "1", "--evaluation"]  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    # not under pytest's (0700) folders: munged runs as the munge user and must reach its own
    state = Path(tempfile.mkdtemp(prefix="ssd300-slurm-"))
    state.chmod(0o755)
    try:
        c = SlurmCluster(state).start()
    except SlurmUnavailable as exc:
        shutil.rmtree(state, ignore_errors=True)
        if os.environ.get("CI"):
            pytest.fail(f"Slurm cannot run here: {exc}")
        pytest.skip(str(exc))
    yield c
    c.stop()
    shutil.rmtree(state, ignore_errors=True)
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    FIGURES_FILE.write_text(json.dumps(FIGURES, indent=2))
    print("\nslurm figures:", json.dumps(FIGURES, indent=2))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("coco"), train=16, val=8, num_classes=4, seed=0)


def submit(cluster: SlurmCluster, data: Path, save: Path, *flags: str) -> str:
    return cluster.submit(
        "--nodes=1", "--ntasks-per-node=1", f"--cpus-per-task={os.cpu_count() or 2}",
        f"--output={save}.out", str(RECIPE), str(data), str(save), *SMALL, *flags,
        env={"SSD300_HOME": str(ROOT), "PYTHON": sys.executable, "GPUS_PER_NODE": "2",
             "SSD300_RECIPE": "1gpu", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def records(save: Path) -> list[dict]:
    path = save / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sbatch_recipe_trains_two_processes_to_a_checkpoint(cluster, data, tmp_path):
    save = tmp_path / "run"
    t0 = time.monotonic()
    job = submit(cluster, data, save, "--epochs", "1")
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    FIGURES["1 epoch, 2 CPU processes: sbatch to COMPLETED s"] = round(time.monotonic() - t0, 1)
    log = Path(f"{save}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-4000:] + cluster.logs()
    assert "1 node(s) x 2 process(es)" in log
    start, end = records(save)[0], records(save)[-1]
    assert start["world_size"] == 2 and start["batches_per_epoch"] == 4  # 16 images / 2 / 2
    assert end["event"] == "end" and end["iteration"] == 4
    a, b = end["parameter_checksums"]
    assert a == b
    ckpt = read_checkpoint(save / "epoch_0.pt")
    assert ckpt["epoch"] == 1 and len(ckpt["rank_state"]) == 2


def test_requeue_of_a_running_job_resumes_from_its_checkpoint(cluster, data, tmp_path):
    save = tmp_path / "requeued"
    t0 = time.monotonic()
    job = submit(cluster, data, save, "--epochs", "3")
    deadline = time.monotonic() + 300
    while not [r for r in records(save) if r["event"] == "step" and r["epoch"] == 1]:
        assert time.monotonic() < deadline, Path(f"{save}.out").read_text(errors="replace")
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), cluster.job(job)
        time.sleep(0.2)
    requeued_at = time.time()
    cluster.cli("scontrol", "requeue", job)
    # the job is stopped (SIGTERM to the steps: the workers write interrupted.pt), then runs again
    deadline = time.monotonic() + 300
    states, running_again = [], None
    while not any(r["event"] == "start" for r in records(save)[1:]):
        assert time.monotonic() < deadline, Path(f"{save}.out").read_text(errors="replace")
        state = cluster.job(job).get("JobState")
        if state != (states or [None])[-1]:
            states.append(state)
            if state == "RUNNING" and len(states) > 1:
                running_again = time.time()
        time.sleep(0.2)
    FIGURES["job states after the requeue"] = " -> ".join(states)
    if running_again:
        FIGURES["requeue to RUNNING again s"] = round(running_again - requeued_at, 1)
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    total = time.monotonic() - t0
    log = Path(f"{save}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-4000:] + cluster.logs()
    assert int(info["Restarts"]) == 1
    assert "SIGTERM: checkpoint written" in log and "resuming from" in log
    assert "resumed from" in log and "interrupted.pt" in log
    rows = records(save)
    second = next(i for i, r in enumerate(rows) if r["event"] == "start" and i > 0)
    before = [r["iteration"] for r in rows[:second] if r["event"] == "step"]
    after = [r["iteration"] for r in rows[second:] if r["event"] == "step"]
    # every iteration once before the requeue, then from where it stopped to the end: 3 x 4
    assert before == list(range(1, len(before) + 1)) and 4 < len(before) < 12
    assert after == list(range(before[-1] + 1, 13)), (before, after)
    assert rows[-1]["event"] == "end" and rows[-1]["iteration"] == 12
    first_step = next(r["time"] for r in rows[second:] if r["event"] == "step")
    FIGURES["3 epochs with one requeue: sbatch to COMPLETED s"] = round(total, 1)
    FIGURES["requeue to the restarted job's first step s"] = round(first_step - requeued_at, 1)
