"""Starting weights: transfer onto other classes, frozen backbones, downloads by the job and the
export (against a local HTTP server: these machines cannot reach the real ones)."""

from __future__ import annotations

import io
import json

import pytest
import torch

from loadtest.processes import free_port
from ssdcore.labels import COCO, ClassList
from tests.file_server import Route, Server, hashed_name
from tests.training.checkpoints import nvidia_like_state
from tests.training.conftest import job, run_train
from training.checkpoint import CheckpointError, backbone_of, read_checkpoint
from training.engine import param_groups
from training.export import main as export_main
from training.model import build_model, freeze_backbone
from training.pretrained import load_pretrained, transfer
from training.synthetic import generate

OWN = ClassList((7, 3, 12), ("Zebra crossing", "Café table", "car"))  # "car" is COCO label 3


def own_dataset(root):
    return generate(root, train=8, val=4, seed=2, categories=list(zip(OWN.ids, OWN.names)))


def nvidia_file(path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file in NVIDIA's published layout (``module.`` prefixes, fp16); returns its tensors."""
    state = {
        k: v.half() if v.is_floating_point() else v for k, v in nvidia_like_state(seed).items()
    }
    label_map = dict(enumerate(["background", *COCO.names]))
    torch.save(
        {"model": {f"module.{k}": v for k, v in state.items()}, "label_map": label_map}, path
    )
    return state


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.stop()


# ----------------------------------------------------------------------------- transfer


def test_transfer_from_nvidia_layout_onto_three_classes():
    source = {k: v.float() for k, v in nvidia_like_state().items()}
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=OWN.num_classes)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = transfer(model, source, COCO, OWN, source="nvidia")
    after = model.state_dict()
    for name, value in after.items():
        if not name.startswith("conf."):
            assert torch.equal(value, source[name]), name
    for level, nd in enumerate(model.spec.boxes_per_location):
        w, b = after[f"conf.{level}.weight"], after[f"conf.{level}.bias"]
        assert w.shape[0] == nd * 4 and b.shape == (nd * 4,)  # anchors x (3 classes + background)
        src = source[f"conf.{level}.weight"]
        # background (0 -> 0) and car (COCO label 3 -> label 3) copied; the two others fresh
        assert torch.equal(w[:nd], src[:nd])
        assert torch.equal(w[3 * nd : 4 * nd], src[3 * nd : 4 * nd])
        assert torch.equal(w[nd : 3 * nd], fresh[f"conf.{level}.weight"][nd : 3 * nd])
    assert report.total == len(after) and len(report.kept) == len(after) - 12
    assert sorted(report.reinitialised) == sorted(
        f"conf.{i}.{p}" for i in range(6) for p in ("weight", "bias")
    )
    assert report.copied_classes == [("background", 0, 0), ("car", 3, 3)]
    assert "transferred 330/342 tensors" in report.lines()[0]


def test_same_classes_keep_the_class_heads():
    source = {k: v.float() for k, v in nvidia_like_state(1).items()}
    model = build_model("resnet50")
    report = transfer(model, source, COCO, COCO)
    assert report.reinitialised == [] and len(report.kept) == report.total
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())


def test_transfer_to_another_backbone_keeps_what_fits():
    source = {k: v.float() for k, v in nvidia_like_state().items()}
    model = build_model("resnet18", num_classes=OWN.num_classes)
    report = transfer(model, source, COCO, OWN)
    # ResNet-18's conv1/bn1 and the last extra blocks fit; most of layer1..3 do not
    assert 0 < len(report.kept) < report.total and report.unused
    assert torch.equal(
        model.state_dict()["feature_extractor.feature_extractor.0.weight"],
        source["feature_extractor.feature_extractor.0.weight"],
    )


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_backbone_is_recognised_from_the_state_dict(arch):
    assert backbone_of(build_model(arch).state_dict()) == arch


def test_pretrained_of_another_backbone_or_no_detector_is_refused(tmp_path):
    nvidia_file(tmp_path / "nvidia.pt")
    model = build_model("resnet18", num_classes=OWN.num_classes)
    with pytest.raises(
        CheckpointError, match=r"has a resnet50 backbone .* pass --backbone resnet50"
    ):
        load_pretrained(model, tmp_path / "nvidia.pt", OWN, "resnet18")
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError, match="goes to --backbone-path"):
        load_pretrained(model, tmp_path / "resnet18.pth", OWN, "resnet18")
    torch.save({"model": model.state_dict(), "classes": {"classes": "?"}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="class list is unusable"):
        load_pretrained(model, tmp_path / "bad.pt", OWN, "resnet18")


@pytest.mark.parametrize("trainable, frozen", [(0, 4), (2, 2), (4, 0)])
def test_freeze_backbone(trainable, frozen):
    model = build_model("resnet18")
    names = freeze_backbone(model, trainable)
    assert len(names) == frozen
    layers = model.feature_extractor.feature_extractor
    stages = {"layer3": [6], "layer2": [5], "layer1": [4], "conv1": [0, 1]}
    model.train()
    for name, indices in stages.items():
        for i in indices:
            is_frozen = name in names
            assert all(p.requires_grad != is_frozen for p in layers[i].parameters())
            bns = [m for m in layers[i].modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert all(bn.training != is_frozen for bn in bns)  # frozen BN stays in eval mode
    optimised = {id(p) for g in param_groups(model, 5e-4) for p in g["params"]}
    assert all((id(p) in optimised) == p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- the job


@pytest.mark.slow
def test_finetune_job_from_nvidia_layout_onto_own_classes(tmp_path):
    """--pretrained with NVIDIA's layout onto 3 classes, zero learning rate, frozen backbone:
    every parameter but the class heads' equals the source after the epoch; the frozen
    backbone's BatchNorm statistics too; the heads are anchors x 4; car's rows are COCO's."""
    data = own_dataset(tmp_path / "own")
    source = nvidia_file(tmp_path / "nvidia_ssdpyt_amp_200703.pt")
    save = tmp_path / "run"
    proc = run_train(
        [
            "--data",
            str(data),
            "--backbone",
            "resnet50",
            "--batch-size",
            "2",
            "--max-train-images",
            "4",
            "--epochs",
            "1",
            "--evaluation",
            "--learning-rate",
            "0",
            "--pretrained",
            str(tmp_path / "nvidia_ssdpyt_amp_200703.pt"),
            "--freeze-backbone",
            "--data-backend",
            "torch",
            "--num-workers",
            "0",
            "--save",
            str(save),
            "--seed",
            "1",
        ]
    )
    log = proc.stderr
    assert "transferred 330/342 tensors" in log, log[-3000:]
    assert "class rows copied by name: background (0 -> 0), car (3 -> 3)" in log
    assert "frozen backbone stages: layer3, layer2, layer1, conv1" in log
    assert "ImageNet" not in log  # no backbone download when --pretrained is given
    ckpt = read_checkpoint(save / "epoch_0.pt")
    state = ckpt["model"]
    assert ClassList.from_json(ckpt["classes"]) == OWN
    model = build_model("resnet50", num_classes=4)
    params = {n for n, _ in model.named_parameters()}
    for name, value in state.items():
        if name.startswith("conf."):
            continue
        if name in params or name.startswith("feature_extractor."):
            assert torch.equal(value, source[name].float()), name
    for level, nd in enumerate(model.spec.boxes_per_location):
        w = state[f"conf.{level}.weight"]
        assert w.shape[0] == nd * 4
        src = source[f"conf.{level}.weight"].float()
        assert torch.equal(w[3 * nd : 4 * nd], src[3 * nd : 4 * nd])
        assert not torch.equal(w[nd : 2 * nd], src[nd : 2 * nd])


@pytest.fixture
def resnet18_weights():
    """A torchvision ResNet-18 state dict as bytes, named by its hash like torchvision's files."""
    import torchvision

    torch.manual_seed(5)
    buf = io.BytesIO()
    torch.save(torchvision.models.resnet18().state_dict(), buf)
    data = buf.getvalue()
    return data, hashed_name(data, "resnet18")


@pytest.mark.slow
def test_two_ranks_download_the_backbone_once(synthetic_coco, tmp_path, server, resnet18_weights):
    data, path = resnet18_weights
    url = server.serve(path, Route(data))
    home = tmp_path / "torch_home"
    save = tmp_path / "run"
    proc = run_train(
        [
            *job(synthetic_coco, "--epochs", "1", "--evaluation", "--save", str(save)),
            "--backbone-weights",
            "IMAGENET1K_V1",
            "--learning-rate",
            "0",
        ],
        nproc=2,
        env={"SSD_BACKBONE_WEIGHTS_URL": url, "TORCH_HOME": str(home)},
    )
    assert server.requests[path] == 1  # local rank 0 downloaded; rank 1 found it in the cache
    cached = home / "hub" / "checkpoints" / path.lstrip("/")
    assert cached.read_bytes() == data
    assert "backbone: ImageNet weights IMAGENET1K_V1" in proc.stderr
    served = torch.load(io.BytesIO(data), weights_only=True)
    state = read_checkpoint(save / "epoch_0.pt")["model"]
    assert torch.equal(
        state["feature_extractor.feature_extractor.0.weight"], served["conv1.weight"]
    )  # the backbone started from the downloaded file (learning rate 0)


def test_offline_backbone_download_stops_the_job_with_a_clear_message(synthetic_coco, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/resnet18-f37072fd.pth"  # nothing listens there
    home = tmp_path / "torch_home"
    proc = run_train(
        [
            *job(synthetic_coco, "--save", str(tmp_path / "run")),
            "--backbone-weights",
            "IMAGENET1K_V2",
        ],
        env={"SSD_BACKBONE_WEIGHTS_URL": url, "TORCH_HOME": str(home)},
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "cannot download the ImageNet weights of resnet18" in err, err[-3000:]
    assert str(home / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in err
    assert "--backbone-path FILE" in err and "--backbone-weights none" in err
    # the job's own message, not a traceback (torchrun adds its summary of the failed child)
    assert "URLError" not in err and "downloads.py" not in err and "pretrained.py" not in err
    assert not list((tmp_path / "run").glob("*.pt"))  # stopped before any work
    assert not list((home / "hub" / "checkpoints").glob("*"))


# ----------------------------------------------------------------------------- export


def test_export_checkpoint_nvidia_downloads_once_then_uses_the_cache(tmp_path, server, monkeypatch):
    source_file = tmp_path / "src.pt"
    nvidia_file(source_file)
    url = server.serve("/nvidia_ssdpyt_amp_200703.pt", Route(source_file.read_bytes()))
    monkeypatch.setenv("SSD_NVIDIA_CHECKPOINT_URL", url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    args = ["--checkpoint", "nvidia", "--formats", "onnx"]
    assert export_main([*args, "--output", str(tmp_path / "a")]) == 0
    assert server.requests["/nvidia_ssdpyt_amp_200703.pt"] == 1
    server.stop()
    assert export_main([*args, "--output", str(tmp_path / "b")]) == 0  # no network needed
    for repo in ("a", "b"):
        model_dir = tmp_path / repo / "ssd300_onnx"
        assert json.loads((model_dir / "1" / "classes.json").read_text()) == COCO.to_json()
        meta = json.loads((model_dir / "1" / "metadata.json").read_text())
        assert meta["random_init"] is False and meta["num_classes"] == 81


def test_export_bad_download_fails_or_falls_back_saying_why(tmp_path, server, monkeypatch):
    url = server.serve("/nvidia_ssdpyt_amp_200703.pt", Route(b"<html>not a checkpoint</html>"))
    monkeypatch.setenv("SSD_NVIDIA_CHECKPOINT_URL", url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    args = ["--checkpoint", "nvidia", "--formats", "onnx"]
    assert export_main([*args, "--output", str(tmp_path / "a")]) == 2
    assert not (tmp_path / "a" / "ssd300_onnx").exists()
    assert not list((tmp_path / "home" / "hub" / "checkpoints").glob("*"))  # not cached
    repo = tmp_path / "b"
    assert export_main([*args, "--output", str(repo), "--fallback-random-init"]) == 0
    meta = json.loads((repo / "ssd300_onnx" / "1" / "metadata.json").read_text())
    assert meta["random_init"] is True
    assert "not usable" in meta["random_init_reason"]


def test_export_needs_a_class_list_for_a_checkpoint_without_one(tmp_path):
    model = build_model("resnet18", num_classes=OWN.num_classes)
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pt")
    args = [
        "--checkpoint",
        str(tmp_path / "bare.pt"),
        "--formats",
        "onnx",
        "--backbone",
        "resnet18",
    ]
    assert export_main([*args, "--output", str(tmp_path / "a")]) == 2  # 3 classes, no list
    ann = own_dataset(tmp_path / "own") / "annotations" / "instances_train2017.json"
    repo = tmp_path / "b"
    assert export_main([*args, "--output", str(repo), "--classes", str(ann)]) == 0
    assert json.loads((repo / "ssd300_onnx" / "1" / "classes.json").read_text()) == OWN.to_json()


class NotWeights:
    """Pickled as a class instance: torch.load(weights_only=True) refuses it."""


@pytest.mark.parametrize("case", ["other ResNet", "not weights only"])
def test_a_bad_backbone_path_is_an_error_line(synthetic_coco, tmp_path, case):
    import torchvision

    path = tmp_path / "backbone.pth"
    if case == "other ResNet":
        torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    else:
        torch.save({"conv1.weight": NotWeights()}, path)
    proc = run_train(
        [*job(synthetic_coco, "--save", str(tmp_path / "run")), "--backbone-path", str(path)],
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"error: --backbone-path {path} is not usable for resnet18" in proc.stderr
    # the job's own message, not a traceback (torchrun adds its summary of the failed child)
    assert "pretrained.py" not in proc.stderr and "UnpicklingError" not in proc.stderr
    assert not list((tmp_path / "run").glob("*.pt"))


@pytest.mark.parametrize("url", ["/opt/nvidia_ssdpyt_amp_200703.pt", "https://example.com/"])
def test_export_with_an_unusable_checkpoint_url_fails_or_falls_back(tmp_path, monkeypatch, url):
    monkeypatch.setenv("SSD_NVIDIA_CHECKPOINT_URL", url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    args = ["--checkpoint", "nvidia", "--formats", "onnx", "--backbone", "resnet18", "--cpu"]
    assert export_main([*args, "--output", str(tmp_path / "a")]) == 2
    assert not (tmp_path / "home").exists() or not list((tmp_path / "home").rglob("*.part"))
    assert export_main([*args, "--output", str(tmp_path / "b"), "--fallback-random-init"]) == 0
    meta = json.loads((tmp_path / "b" / "ssd300_onnx" / "1" / "metadata.json").read_text())
    assert meta["random_init"] is True and "http" in meta["random_init_reason"]
