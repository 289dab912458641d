"""Export: ONNX / TorchScript parity with the eager graph, repository layout, configs, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ssdcore.labels import COCO
from ssdcore.repository import ModelStore
from training.export import MODEL_NAMES, ExportOptions, main, triton_config
from training.export.served import ServedSSD
from training.model import build_model, calibrate_random_model

ROOT = Path(__file__).resolve().parents[2]


def assert_candidates_match(a, b, tol=2e-3):
    """Two top-K outputs (boxes, scores, classes) of one image agree up to float noise.

    Every candidate of ``a`` must have a partner in ``b`` with the same class and close score and
    box, except candidates whose score is within ``tol`` of the K-th score (they may legitimately
    fall on either side of the top-K cut between two runtimes).
    """
    (ba, sa, ca), (bb, sb, cb) = a, b
    np.testing.assert_allclose(sa, sb, atol=tol)
    same = (
        (ca[:, None] == cb[None, :])
        & (np.abs(sa[:, None] - sb[None, :]) <= tol)
        & (np.abs(ba[:, None, :] - bb[None, :, :]).max(-1) <= tol)
    )
    needs_partner = sa > sa.min() + tol
    assert needs_partner.mean() > 0.5
    missing = np.flatnonzero(needs_partner & ~same.any(axis=1))
    assert missing.size == 0, f"{missing.size} candidates without a partner, e.g. #{missing[:5]}"


@pytest.fixture(scope="module")
def eager(model_repo):
    torch.manual_seed(0)
    model = build_model()
    calibrate_random_model(model)
    return model.eval()


def run_eager(model, images, raw=False):
    served = ServedSSD(model, topk=2000, raw=raw).eval()
    with torch.no_grad():
        return [t.numpy() for t in served(torch.from_numpy(images))]


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_and_torchscript_match_eager(model_repo, eager, test_images, batch):
    images = test_images[:batch]
    ref = run_eager(eager, images)
    session = ort.InferenceSession(str(model_repo / "ssd300_onnx" / "1" / "model.onnx"))
    onnx_out = session.run(["boxes", "scores", "classes"], {"images": images})
    script = torch.jit.load(str(model_repo / "ssd300_torchscript" / "1" / "model.pt"))
    with torch.no_grad():
        ts_out = [t.numpy() for t in script(torch.from_numpy(images))]
    for out in (onnx_out, ts_out):
        assert out[0].shape == (batch, 2000, 4) and out[0].dtype == np.float32
        assert out[1].shape == (batch, 2000) and out[2].dtype == np.int32
        assert out[2].min() >= 1 and out[2].max() <= 80
        for i in range(batch):
            assert_candidates_match([o[i] for o in out], [r[i] for r in ref])


def test_raw_export_matches_eager(model_repo, eager, test_images):
    locs, logits = run_eager(eager, test_images[:2], raw=True)
    session = ort.InferenceSession(str(model_repo / "ssd300_raw" / "1" / "model.onnx"))
    o_locs, o_logits = session.run(["locs", "logits"], {"images": test_images[:2]})
    assert o_locs.shape == (2, 4, 8732) and o_logits.shape == (2, 81, 8732)
    np.testing.assert_allclose(o_locs, locs, atol=5e-3)
    np.testing.assert_allclose(o_logits, logits, atol=5e-3)


def test_candidates_are_the_decoded_top_k(model_repo, eager, test_images):
    """The graph's candidates are exactly softmax + decode + top-K of the raw outputs."""
    from ssdcore.anchors import default_boxes
    from ssdcore.postprocess import decode_boxes, softmax

    locs, logits = run_eager(eager, test_images[:1], raw=True)
    boxes, scores, classes = run_eager(eager, test_images[:1])
    probs = softmax(logits.transpose(0, 2, 1), -1)[0][:, 1:]
    decoded = decode_boxes(locs, np.array(default_boxes()))[0]
    flat = probs.reshape(-1)
    top = np.argsort(-flat, kind="stable")[:2000]
    np.testing.assert_allclose(scores[0], flat[top], rtol=1e-5)
    np.testing.assert_array_equal(classes[0][:100], top[:100] % 80 + 1)
    np.testing.assert_allclose(boxes[0][:100], decoded[top[:100] // 80], atol=1e-5)


def test_repository_layout_and_metadata(model_repo):
    for fmt in ("onnx", "torchscript", "python", "raw"):
        d = model_repo / MODEL_NAMES[fmt]
        assert (d / "config.pbtxt").read_text().startswith(f'name: "{MODEL_NAMES[fmt]}"')
        v = d / "1"  # a version holds its own class list and metadata
        assert (v / "labels.txt").read_text().splitlines() == ["background", *COCO.names]
        assert json.loads((v / "classes.json").read_text()) == COCO.to_json()
        meta = json.loads((v / "metadata.json").read_text())
        assert meta["random_init"] is True and meta["version"] == 1
        assert meta["topk"] == (0 if fmt == "raw" else 2000)
        assert set(meta["files"]) >= {"classes.json", "labels.txt"}
        assert ModelStore(model_repo, MODEL_NAMES[fmt]).version(1).verify().format == fmt
        assert [p.name for p in d.iterdir() if p.name.startswith(".")] == [".highest-version"]
    assert (model_repo / "ssd300_python" / "1" / "model.py").is_file()
    cfg = (model_repo / "ssd300_python" / "config.pbtxt").read_text()
    assert "max_queue_size: 64" in cfg and "timeout_action: REJECT" in cfg


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "python"])
def test_checked_in_configs_are_the_generated_ones(fmt):
    """model_repository/ holds the configs `python -m training.export` writes by default."""
    folder = ROOT / "model_repository" / MODEL_NAMES[fmt]
    assert (folder / "config.pbtxt").read_text() == triton_config(fmt, ExportOptions())
    assert (
        "version_policy: { latest: { num_versions: 2 } }" in (folder / "config.pbtxt").read_text()
    )


def test_refuses_without_weights(tmp_path):
    with pytest.raises(SystemExit, match="refusing to export without weights"):
        main(["--output", str(tmp_path), "--formats", "onnx"])
    assert not any(tmp_path.iterdir())


def test_nvidia_checkpoint_exports(tmp_path, test_images):
    """A checkpoint in NVIDIA's layout (module. prefix, fp16) exports; the graph uses its weights."""
    torch.manual_seed(1)
    model = build_model()
    calibrate_random_model(model)
    state = {
        f"module.{k}": (v.half() if v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }
    ckpt = tmp_path / "nvidia_ssdpyt_amp_200703.pt"
    torch.save(
        {
            "model": state,
            "epoch": 65,
            "iteration": 1,
            "label_map": dict(enumerate(["background", *COCO.names])),
        },
        ckpt,
    )
    repo = tmp_path / "repo"
    assert main(["--checkpoint", str(ckpt), "--output", str(repo), "--formats", "onnx"]) == 0
    meta = json.loads((repo / "ssd300_onnx" / "1" / "metadata.json").read_text())
    assert meta["random_init"] is False and len(meta["source"]["sha256"]) == 64
    # the exported graph computes with the checkpoint's (fp16-rounded) weights
    model.load_state_dict({k[len("module.") :]: v for k, v in state.items()})
    ref = run_eager(model.eval(), test_images[:1])
    out = ort.InferenceSession(str(repo / "ssd300_onnx" / "1" / "model.onnx")).run(
        None, {"images": test_images[:1]}
    )
    assert_candidates_match([o[0] for o in out], [r[0] for r in ref])


def test_ensure_skips_an_export_of_the_same_weights(model_repo, tmp_path):
    before = (model_repo / "ssd300_onnx" / "1" / "model.onnx").stat().st_mtime_ns
    args = ["--output", str(model_repo), "--formats", "onnx", "--ensure", "--cpu"]
    assert main([*args, "--random-init"]) == 0
    assert (model_repo / "ssd300_onnx" / "1" / "model.onnx").stat().st_mtime_ns == before
    assert [v.number for v in ModelStore(model_repo, "ssd300_onnx").versions()] == [1]
