"""Shared test configuration: markers and the skip rule for GPU tests."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory):
    """A model repository exported once per session from a random-init model (all formats)."""
    from training.export import ExportOptions, export

    repo = tmp_path_factory.mktemp("model_repository")
    export(
        repo,
        ["onnx", "torchscript", "python"],
        random_init=True,
        opts=ExportOptions(topk=2000, gpu=False),
        raw=True,
    )
    return repo


@pytest.fixture(scope="session")
def test_images():
    """uint8 (5, 300, 300, 3) smooth colour-field images."""
    from training.model import smooth_noise_images

    imgs = smooth_noise_images(5, seed=42)
    return (imgs * 255).round().to(dtype=__import__("torch").uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="session")
def figures():
    """Record reliability figures: {case: {"expected", "observed", "figure"}}.

    Written as JSON to $SSD300_FIGURES when set (loadtest/reliability_report.py renders them
    into docs/reliability.md); otherwise only kept in memory.
    """
    import json
    import os

    table: dict[str, dict] = {}

    def record(case: str, expected: str, observed: str, figure: str) -> None:
        table[case] = {"expected": expected, "observed": observed, "figure": figure}

    yield record
    path = os.environ.get("SSD300_FIGURES")
    if path and table:
        existing = {}
        if os.path.exists(path):
            with open(path) as f:
                existing = json.load(f)
        existing.update(table)
        with open(path, "w") as f:
            json.dump(existing, f, indent=2)
