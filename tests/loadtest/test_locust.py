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
    """The soak script for 30 s of warm-up and one measured minute: no failures; over the second
    half of the measured minute memory (least-squares trend) and open files stay flat."""
    import json

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "loadtest" / "soak.py"),
            "--minutes",
            "1",
            "--users",
            "16",
            "--warmup",
            "30",
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
    assert summary["rss_growth_second_half_mb"] < 30
    assert abs(summary["fds_end"] - summary["fds_start"]) <= 4
    figures(
        "soak, short (16 users, 30 s warm-up + 1 min)",
        "all 200, RSS and files flat",
        f"{summary['failures']} failures of {summary['requests']}",
        f"RSS {summary['rss_growth_second_half_mb']:+.1f} MB over the second half; "
        f"files {summary['fds_start']} -> {summary['fds_end']}",
    )
