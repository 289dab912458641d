"""The training job end to end on CPU: DDP, resume, evaluation, learning, errors, benchmarks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.training.conftest import (
    at_most_twice,
    job,
    read_metrics,
    run_train,
    same_run,
    same_tensors,
    step_losses,
    train_command,
    train_env,
)
from training.checkpoint import (
    load_manifest,
    lock_folder,
    read_checkpoint,
    resolve_checkpoint,
)

pytestmark = pytest.mark.slow


def test_ddp_two_processes_stay_in_step(synthetic_coco, tmp_path):
    """torchrun with 2 CPU processes (gloo) and DALI: same parameters on both ranks, checkpoint;
    --max-train-images chosen on rank 0 and shared (12 of the 16 images, 6 per rank)."""
    run_train(
        job(
            synthetic_coco,
            "--epochs",
            "1",
            "--evaluation",
            "--save",
            str(tmp_path),
            "--max-train-images",
            "12",
            backend="dali",
        ),
        nproc=2,
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    start = records[0]
    assert start["world_size"] == 2 and start["batches_per_epoch"] == 3  # 12 images / 2 ranks / 2
    assert math.isclose(start["lr"], 2.6e-3 * 2 * 2 / 32)  # base x world size x batch / 32
    end = records[-1]
    assert end["event"] == "end" and end["iteration"] == 3
    a, b = end["parameter_checksums"]
    assert a == b
    ckpt = read_checkpoint(tmp_path / "epoch_0.pt")
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 3
    assert len(ckpt["rank_state"]) == 2 and all(r["data"] for r in ckpt["rank_state"])
    assert ckpt["config"]["batch_size"] == 2
    (entry,) = json.loads((tmp_path / "checkpoints.json").read_text())["checkpoints"]
    assert entry["file"] == "epoch_0.pt" and len(entry["sha256"]) == 64


def test_recipe_runs_as_two_nodes_with_c10d_rendezvous(synthetic_coco, tmp_path):
    """recipes/ssd300_1gpu.sh started twice as two "nodes" of one process each (NNODES=2, one
    c10d rendezvous endpoint, CPU/gloo), the documented multi-node command: global ranks 0 and 1
    with local rank 0 on both, parameters in step, only global rank 0 writes."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from loadtest.processes import free_port
    from tests.training.conftest import ROOT, SMALL

    save = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DATA": str(synthetic_coco),
        "SAVE": str(save),
        "NNODES": "2",
        "MASTER": f"127.0.0.1:{free_port()}",
        "OMP_NUM_THREADS": "1",
    }
    # the recipe's own flags first, then these override them (argparse keeps the last value)
    small = ["--epochs", "1", "--batch-size", "2", "--evaluation", "--no-amp"]
    small += ["--data-backend", "torch", *SMALL]
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
    nodes = []
    try:
        for node, log in enumerate(logs):
            with open(log, "wb") as out:  # files, not pipes: a full pipe would stall a node
                nodes.append(
                    subprocess.Popen(
                        ["bash", str(ROOT / "recipes" / "ssd300_1gpu.sh"), *small],
                        env={**env, "NODE_RANK": str(node)},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 600
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for node in nodes:  # torchrun (the recipe execs it) stops its worker on SIGTERM
            if node.poll() is None:
                node.terminate()
                try:
                    node.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "".join(
        log.read_text(errors="replace")[-3000:] for log in logs
    )
    records = read_metrics(save / "metrics.jsonl")
    start, end = records[0], records[-1]
    assert start["world_size"] == 2 and start["batches_per_epoch"] == 4  # 16 images / 2 / 2
    assert end["event"] == "end" and end["iteration"] == 4
    a, b = end["parameter_checksums"]
    assert a == b
    ckpt = read_checkpoint(save / "epoch_0.pt")
    assert len(ckpt["rank_state"]) == 2 and ckpt["config"]["batch_size"] == 2
    assert sorted(p.name for p in save.iterdir()) == [
        ".lock",
        "checkpoints.json",
        "epoch_0.pt",
        "metrics.jsonl",
    ]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_is_exact(synthetic_coco, tmp_path, backend, figures):
    """4 epochs straight == 2 epochs + resume for 2: same per-step losses and parameters."""
    common = job(
        synthetic_coco,
        "--evaluation",
        "--max-train-images",
        "8",
        "--multistep",
        "3",
        batch_size=4,
        backend=backend,
    )

    def attempt(folder: Path) -> tuple[str, int]:
        straight, first, second = folder / "straight", folder / "a", folder / "b"
        run_train([*common, "--epochs", "4", "--save", str(straight)])
        run_train([*common, "--epochs", "2", "--save", str(first)])
        checkpoint = str(first / "epoch_1.pt")
        run_train([*common, "--epochs", "4", "--save", str(second), "--checkpoint", checkpoint])
        whole = step_losses(straight / "metrics.jsonl")
        resumed = step_losses(first / "metrics.jsonl") + step_losses(second / "metrics.jsonl")
        assert len(whole) == len(resumed) > 4
        agreement = same_run(whole, resumed)
        a = read_checkpoint(straight / "epoch_3.pt")
        b = read_checkpoint(second / "epoch_3.pt")
        same_tensors(a["model"], b["model"])
        assert a["scheduler"] == b["scheduler"] and a["iteration"] == b["iteration"]
        return agreement, len(a["model"])

    (agreement, tensors), steps = at_most_twice(attempt, tmp_path), 8
    figures(
        f"4 epochs vs 2 + resume 2 ({backend} data, CPU)",
        "identical parameters and losses",
        agreement,
        f"{steps} per-step losses; all {tensors} tensors",
    )


def test_evaluation_mode(synthetic_coco, tmp_path):
    run_train(
        job(synthetic_coco, "--epochs", "1", "--evaluation", "--save", str(tmp_path), batch_size=4)
    )
    proc = run_train(
        job(
            synthetic_coco,
            "--mode",
            "evaluation",
            "--checkpoint",
            str(tmp_path / "epoch_0.pt"),
            "--eval-batch-size",
            "4",
        )
    )
    lines = [ln for ln in proc.stdout.splitlines() if "Average" in ln]
    assert len(lines) == 12  # the standard COCO summary
    assert "(8 images," in proc.stdout


def test_learns_for_real(overfit_run):
    """On 8 images (2 classes, no augmentation) the model overfits within 50 steps.

    Thresholds: the loss must fall below a quarter of its first value, and mAP@0.5 on those
    images must reach 0.3; a random model scores about 0.005 there (measured), one trained this
    way about 0.6.
    """
    folder, proc = overfit_run
    losses = step_losses(folder / "metrics.jsonl")
    assert len(losses) == 50
    assert sum(losses[-5:]) / 5 < 0.25 * losses[0], losses
    evals = [r for r in read_metrics(folder / "metrics.jsonl") if r["event"] == "eval"]
    assert evals[0]["AP50"] >= 0.3, (evals, proc.stdout[-2000:])
    # --keep-checkpoints 2: the two newest epochs stay, listed and intact; the others are gone
    assert sorted(p.name for p in folder.glob("epoch_*.pt")) == ["epoch_23.pt", "epoch_24.pt"]
    assert [e["file"] for e in load_manifest(folder)] == ["epoch_23.pt", "epoch_24.pt"]
    assert resolve_checkpoint(folder) == (folder / "epoch_24.pt", [])


@pytest.mark.parametrize("mode", ["benchmark-training", "benchmark-inference"])
def test_benchmark_modes(synthetic_coco, mode):
    proc = run_train(
        job(
            synthetic_coco,
            "--mode",
            mode,
            "--eval-batch-size",
            "2",
            "--benchmark-warmup",
            "1",
            "--benchmark-iterations",
            "3",
        )
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == mode and result["iterations"] == 3
    assert result["median_images_per_s_total"] > 0
    assert result["median_images_per_s_per_process"] == result["median_images_per_s_total"]


def test_clear_errors(tmp_path, synthetic_coco, figures):
    missing = run_train(["--data", str(tmp_path / "nope"), "--epochs", "1"], check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "train2017").mkdir()
    (bad / "val2017").mkdir()
    (bad / "annotations" / "instances_train2017.json").write_text("{not json")
    (bad / "annotations" / "instances_val2017.json").write_text("{}")
    broken = run_train(["--data", str(bad), "--epochs", "1"], check=False)
    assert broken.returncode != 0 and "not valid JSON" in broken.stderr
    # two processes: rank 0 alone parses the annotations; both stop, neither waits for the other
    broken2 = run_train(["--data", str(bad), "--epochs", "1"], nproc=2, check=False, timeout=300)
    assert broken2.returncode != 0 and "not valid JSON" in broken2.stderr
    assert "rank 0 found the data unusable" in broken2.stderr
    one = run_train(["--data", str(synthetic_coco), "--batch-size", "1"], check=False)
    assert one.returncode != 0 and "at least 2 per process" in one.stderr
    held = lock_folder(tmp_path / "busy")  # another job is saving there
    try:
        busy = run_train(
            job(synthetic_coco, "--epochs", "1", "--save", str(tmp_path / "busy")), check=False
        )
    finally:
        held.close()
    assert busy.returncode != 0 and "another training job is saving into" in busy.stderr
    figures(
        "missing data folder / bad annotation JSON / batch size 1 / save folder in use",
        "clear error before work",
        "4 clear errors",
        "exit codes " + ", ".join(str(p.returncode) for p in (missing, broken, one, busy)),
    )


def test_sigterm_saves_and_resume_continues_exactly(synthetic_coco, tmp_path, figures):
    """SIGTERM to torchrun mid-epoch: a checkpoint, a clean exit, and an exact continuation."""
    import signal
    import subprocess
    import time

    from tests.training.conftest import ROOT

    common = job(synthetic_coco, "--evaluation", "--epochs", "1")

    def attempt(folder: Path) -> tuple[str, int, float]:
        straight, first, second = folder / "straight", folder / "first", folder / "second"
        run_train([*common, "--save", str(straight)])
        proc = subprocess.Popen(
            train_command([*common, "--save", str(first)]),
            cwd=ROOT,
            env=train_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log = first / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log.exists() and len(step_losses(log)) >= 3:
                break
            time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        assert elapsed < 30
        ckpt = read_checkpoint(first / "interrupted.pt")
        assert 3 <= ckpt["batch"] < 8 and ckpt["epoch"] == 0, out[-2000:]
        manifest = json.loads((first / "checkpoints.json").read_text())["checkpoints"]
        assert manifest[-1]["file"] == "interrupted.pt"
        run_train([*common, "--save", str(second), "--checkpoint", str(first / "interrupted.pt")])
        losses = step_losses(first / "metrics.jsonl") + step_losses(second / "metrics.jsonl")
        return same_run(losses, step_losses(straight / "metrics.jsonl")), ckpt["batch"], elapsed

    (agreement, batch, elapsed) = at_most_twice(attempt, tmp_path)
    figures(
        "SIGTERM to torchrun mid-epoch",
        "checkpoint within 30 s, clean exit, resume",
        f"interrupted.pt at batch {batch} of 8",
        f"exit after {elapsed:.1f} s; resumed run's losses and the uninterrupted run's: {agreement}",
    )


def test_nan_once_is_skipped_on_every_rank(synthetic_coco, tmp_path, figures):
    run_train(
        job(synthetic_coco, "--epochs", "1", "--evaluation", "--save", str(tmp_path)),
        nproc=2,
        env={"SSD300_FAULT_NAN_AT": "2", "SSD300_FAULT_RANK": "1"},
    )
    end = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert end["skipped_steps"] == 1 and end["iteration"] == 4
    a, b = end["parameter_checksums"]
    assert a == b and math.isfinite(a)
    figures(
        "NaN loss once (on rank 1 of 2)",
        "step skipped on every rank, training continues",
        "1 skipped step of 4",
        "parameters identical on both ranks afterwards",
    )


def test_persistent_nan_stops_all_ranks(synthetic_coco, tmp_path, figures):
    proc = run_train(
        job(synthetic_coco, "--epochs", "1", "--evaluation", "--max-nan-steps", "2"),
        nproc=2,
        env={"SSD300_FAULT_NAN_AT": "1,2,3,4,5,6,7,8", "SSD300_FAULT_RANK": "0"},
        check=False,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "not finite for 3 consecutive steps" in proc.stderr
    figures(
        "persistent NaN (rank 0 of 2)",
        "all ranks stop cleanly",
        f"exit {proc.returncode}",
        "stopped after 3 consecutive non-finite steps (--max-nan-steps 2)",
    )


def test_kill_during_checkpoint_write_and_corruption_fallback(synthetic_coco, tmp_path, figures):
    """A crash while writing epoch_1.pt leaves epoch_0.pt valid; a corrupted newest checkpoint
    is detected and resuming falls back to the previous one."""
    common = job(synthetic_coco, "--evaluation", "--max-train-images", "8", batch_size=4)
    crashed = run_train(
        [*common, "--epochs", "3", "--save", str(tmp_path)],
        check=False,
        env={"SSD300_FAULT_KILL_SAVING": "2"},
    )
    assert crashed.returncode != 0
    manifest = json.loads((tmp_path / "checkpoints.json").read_text())["checkpoints"]
    assert [e["file"] for e in manifest] == ["epoch_0.pt"]
    assert not (tmp_path / "epoch_1.pt").exists()
    partial = list(tmp_path.glob(".epoch_1.pt.*.tmp"))
    assert len(partial) == 1  # what the crash left behind
    read_checkpoint(tmp_path / "epoch_0.pt")  # still intact

    resumed = run_train(
        [*common, "--epochs", "3", "--save", str(tmp_path), "--checkpoint", str(tmp_path)]
    )
    assert "resumed from" in resumed.stderr and "epoch_0.pt" in resumed.stderr
    assert f"removed {partial[0]}" in resumed.stderr
    assert not list(tmp_path.glob(".*.tmp"))  # the partial write is cleaned up
    names = [
        e["file"] for e in json.loads((tmp_path / "checkpoints.json").read_text())["checkpoints"]
    ]
    assert names == ["epoch_0.pt", "epoch_1.pt", "epoch_2.pt"]

    # flip one byte in the newest checkpoint: detected, and epoch_1.pt is used instead
    newest = tmp_path / "epoch_2.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    again = run_train(
        [*common, "--epochs", "3", "--save", str(tmp_path / "again"), "--checkpoint", str(newest)]
    )
    assert "does not match its recorded SHA-256" in again.stderr
    assert "epoch_1.pt at epoch 2" in again.stderr
    figures(
        "kill (SIGKILL) during a checkpoint write",
        "previous checkpoint stays valid",
        "epoch_0.pt intact and listed; the partial file never listed, deleted on resume",
        "resumed from it",
    )
    figures(
        "bit-flipped newest checkpoint",
        "detected; resume falls back",
        "SHA-256 mismatch reported",
        "resumed from the previous epoch's checkpoint",
    )


def test_malicious_checkpoint_is_refused_by_the_job(synthetic_coco, tmp_path, figures):
    import os

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {}, "x": Payload()}, evil)
    proc = run_train(job(synthetic_coco, "--checkpoint", str(evil), "--epochs", "1"), check=False)
    assert proc.returncode != 0 and "weights-only" in proc.stderr
    assert not marker.exists()
    figures(
        "malicious pickle as --checkpoint",
        "refused, no side effect",
        "refused (weights-only load)",
        "the payload's command never ran",
    )
