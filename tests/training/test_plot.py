from __future__ import annotations

import json

import numpy as np
from PIL import Image

from training.plot import main


def test_plot_writes_a_png(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"event": "start"}]
    rows += [
        {"event": "step", "iteration": i, "loss": 10 / i, "lr": 0.01 * min(1, i / 5)}
        for i in range(1, 30)
    ]
    rows += [{"event": "eval", "epoch": e, "AP": 0.1 * e, "AP50": 0.2 * e} for e in range(3)]
    log.write_text("\n".join(json.dumps(r) for r in rows))
    assert main([str(log)]) == 0
    img = Image.open(tmp_path / "curves.png")
    assert img.size == (1500, 400)
    assert len(np.unique(np.asarray(img.convert("L")))) > 10  # something was drawn
