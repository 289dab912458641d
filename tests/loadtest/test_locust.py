"""A short locust run against the real service (embedded backend): zero failures."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.run import locust_command

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_short_locust_run_has_no_failures(service, tmp_path):
    corpus = tmp_path / "corpus"
    subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "corpus.py"), "--out", str(corpus)], check=True
    )
    prefix = tmp_path / "run"
    proc = subprocess.run(
        locust_command(service.url, 4, 15, prefix, "--html", f"{prefix}.html"),
        capture_output=True,
        text=True,
        timeout=120,
        env={"LOADTEST_CORPUS": str(corpus), "PATH": "/usr/bin:/bin"},
    )
    with open(f"{prefix}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 5, proc.stderr[-2000:]
    assert int(total["Failure Count"]) == 0, proc.stderr[-2000:]
    assert "POST /v1/detect (1 image)" in rows
    assert proc.returncode == 0
    assert Path(f"{prefix}.html").stat().st_size > 1000


def test_short_soak(model_repo, tmp_path, figures):
    """The soak script for 30 s of warm-up and one measured minute, 8 users: no failures; open
    files flat; memory flat: its least-squares trend over the measured minute (sampled every
    second) within 30 MB, or within 4 standard errors of that trend where that is larger (a
    minute's RSS swings by about 30 MB around its trend as batches come and go, which puts the
    trend's standard error near 14 MB; the 10-minute soak of the reliability report is the long
    check)."""
    import json

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "loadtest" / "soak.py"),
            "--minutes",
            "1",
            "--users",
            "8",
            "--warmup",
            "30",
            "--sample-s",
            "1",
            "--repo",
            str(model_repo),
            "--out",
            str(tmp_path / "soak"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["requests"] > 10 and summary["failures"] == 0
    growth, se = summary["rss_growth_measured_mb"], summary["rss_growth_se_mb"]
    assert growth < max(30, 4 * se), summary
    assert abs(summary["fds_end"] - summary["fds_start"]) <= 4
    figures(
        "soak, short (8 users, 30 s warm-up + 1 min)",
        "all 200, files flat, RSS trend < max(30 MB, 4 standard errors)",
        f"{summary['failures']} failures of {summary['requests']}",
        f"RSS trend {growth:+.1f} MB over the minute (standard error {se:.1f} MB, noise "
        f"{summary['rss_noise_mb']:.1f} MB); "
        f"files {summary['fds_start']} -> {summary['fds_end']}",
    )
