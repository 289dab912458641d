"""Checkpoints for the tests: random tensors in the layout of NVIDIA's published checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# keys, shapes and dtypes of NVIDIA's published checkpoint (nvidia_ssdpyt_amp_200703.pt)
KEYS_FILE = Path(__file__).resolve().parents[1] / "data" / "nvidia_checkpoint_keys.json"


def nvidia_key_list() -> list[dict]:
    return json.loads(KEYS_FILE.read_text())


def nvidia_like_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the keys, shapes and dtypes listed for NVIDIA's checkpoint."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for entry in nvidia_key_list():
        dtype = getattr(torch, entry["dtype"])
        if dtype.is_floating_point:
            t = torch.randn(entry["shape"], generator=g, dtype=torch.float32) * 0.05
            if entry["key"].endswith("running_var"):
                t = t.abs() + 0.5
            state[entry["key"]] = t.to(dtype)
        else:
            state[entry["key"]] = torch.tensor(7, dtype=dtype).reshape(entry["shape"])
    return state
