from __future__ import annotations

import pytest
import torch

from training.model import BACKBONES, build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model().eval()


def test_parameter_count(model):
    assert sum(p.numel() for p in model.parameters()) == 22_894_902
    assert all(p.requires_grad for p in model.parameters())
    assert len(model.state_dict()) == 342


def test_part_sizes(model):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.feature_extractor) == 8_543_296
    assert count(model.additional_blocks) == 3_773_696
    assert count(model.loc) == 497_784
    assert count(model.conf) == 10_080_126


def test_heads_have_no_batchnorm(model):
    for head in (model.loc, model.conf):
        assert all(isinstance(m, torch.nn.Conv2d) for m in head)


def test_shapes_and_determinism(model):
    x = torch.randn(2, 3, 300, 300)
    with torch.no_grad():
        locs, logits = model(x)
        locs2, logits2 = model(x)
    assert locs.shape == (2, 4, 8732) and logits.shape == (2, 81, 8732)
    assert torch.equal(locs, locs2) and torch.equal(logits, logits2)
    # batch independence in eval mode
    with torch.no_grad():
        one_locs, _ = model(x[:1])
    torch.testing.assert_close(one_locs, locs[:1], rtol=1e-4, atol=1e-4)


def test_feature_map_sizes(model):
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        f = model.feature_extractor(x)
        sizes = [tuple(f.shape[1:])]
        for block in model.additional_blocks:
            f = block(f)
            sizes.append(tuple(f.shape[1:]))
    assert sizes == [
        (1024, 38, 38),
        (512, 19, 19),
        (512, 10, 10),
        (256, 5, 5),
        (256, 3, 3),
        (256, 1, 1),
    ]


@pytest.mark.parametrize("name", [b for b in BACKBONES if b != "resnet50"])
def test_other_backbones(name):
    m = build_model(name).eval()
    with torch.no_grad():
        locs, logits = m(torch.randn(1, 3, 300, 300))
    assert locs.shape == (1, 4, 8732) and logits.shape == (1, 81, 8732)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("vgg16")


def test_backbone_weights_from_local_file(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet50(weights=None)
    torch.nn.init.constant_(resnet.conv1.weight, 0.123)
    path = tmp_path / "r50.pth"
    torch.save(resnet.state_dict(), path)
    m = build_model(backbone_path=path)
    assert torch.all(m.feature_extractor.feature_extractor[0].weight == 0.123)


def test_cpu_bf16_training_step_runs_in_bf16_and_agrees_with_fp32():
    """--cpu-bf16: the forward pass of a training step runs in bf16 on the CPU (its outputs are
    bf16), the loss stays fp32 and no scaler is involved; the step's loss and gradients agree
    with an fp32 step's on the same weights and batch (bf16 keeps 8 bits of mantissa)."""
    import copy

    from training.engine import TrainStep, autocast
    from training.loss import MultiboxLoss

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3).train()
    with autocast(torch.device("cpu"), True):
        locs, logits = model(torch.rand(2, 3, 300, 300))
    assert locs.dtype == logits.dtype == torch.bfloat16
    images = torch.rand(2, 3, 300, 300)
    boxes = torch.rand(2, 8732, 4) * 0.2 + torch.tensor([0.4, 0.4, 0.1, 0.1])
    labels = torch.zeros(2, 8732, dtype=torch.long)
    labels[:, :40] = 1
    grads = {}
    for amp in (False, True):
        m = copy.deepcopy(model)
        optimizer = torch.optim.SGD(m.parameters(), lr=0.0)
        optimizer.zero_grad = lambda set_to_none=True: None  # keep the gradients to compare
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        step = TrainStep(m, MultiboxLoss(), optimizer, scaler, torch.device("cpu"), amp=amp)
        result = step((images, boxes, labels))
        grads[amp] = (result.loss, torch.cat([p.grad.flatten() for p in m.parameters()]))
    (loss32, g32), (loss16, g16) = grads[False], grads[True]
    assert abs(loss16 - loss32) < 0.01 * abs(loss32), (loss16, loss32)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.85  # 0.96 measured (AMX)
