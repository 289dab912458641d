"""The CUDA paths (skipped without a GPU): fp16 autocast + GradScaler steps with channels_last,
gradient-overflow skipping, the job's benchmark and training modes on the GPU (nccl), and the
exported TorchScript model (traced on the CPU) running on the GPU as Triton's libtorch would."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.training.conftest import job, read_metrics, run_train
from training.box_coding import BoxEncoder
from training.checkpoint import read_checkpoint
from training.engine import TrainStep, param_groups
from training.export import export_torchscript
from training.export.served import ServedSSD
from training.loss import MultiboxLoss
from training.model import build_model, calibrate_random_model, smooth_noise_images

pytestmark = pytest.mark.gpu


def make_batch(n: int = 4, seed: int = 0):
    """Normalised smooth images and encoded targets of one random box each."""
    g = torch.Generator().manual_seed(seed)
    images = (smooth_noise_images(n, seed=seed) - 0.45) / 0.225
    encoder = BoxEncoder()
    boxes, labels = [], []
    for _ in range(n):
        xy = torch.rand(2, generator=g) * 0.5
        box = torch.cat([xy, xy + 0.2 + 0.3 * torch.rand(2, generator=g)]).clamp(max=1).view(1, 4)
        b, lab = encoder.encode(box, torch.tensor([1 + int(torch.randint(80, (), generator=g))]))
        boxes.append(b)
        labels.append(lab)
    return images, torch.stack(boxes), torch.stack(labels)


def small_model():
    torch.manual_seed(0)
    model = build_model("resnet18").cuda()
    optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=1e-3, momentum=0.9)
    return model, MultiboxLoss().cuda(), optimizer


def test_amp_steps_learn_with_fp32_master_weights():
    model, loss_fn, optimizer = small_model()
    scaler = torch.amp.GradScaler("cuda")
    batch = make_batch()
    cuda = torch.device("cuda")
    train_step = TrainStep(model, loss_fn, optimizer, scaler, cuda, amp=True, channels_last=True)
    losses = [train_step(batch).loss for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.autocast("cuda", dtype=torch.float16):
        locs, logits = model(batch[0].cuda().contiguous(memory_format=torch.channels_last))
    assert locs.dtype == logits.dtype == torch.float16


def test_gradient_overflow_skips_the_step():
    model, loss_fn, optimizer = small_model()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**60)  # fp16 gradients overflow
    before = [p.detach().clone() for p in model.parameters()]
    train_step = TrainStep(model, loss_fn, optimizer, scaler, torch.device("cuda"), amp=True)
    loss, stepped, _ = train_step(make_batch())
    assert math.isfinite(loss) and not stepped
    assert scaler.get_scale() < 2.0**60
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.slow
def test_benchmark_mode_on_the_gpu(synthetic_coco):
    proc = run_train(
        job(
            synthetic_coco,
            "--mode",
            "benchmark-training",
            "--device",
            "cuda",
            "--benchmark-warmup",
            "2",
            "--benchmark-iterations",
            "5",
            batch_size=8,
        )
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["amp"] is True and result["device"].startswith("cuda")
    assert result["median_images_per_s_total"] > 0


@pytest.mark.slow
def test_amp_training_with_evaluation_on_the_gpu(synthetic_coco, tmp_path):
    run_train(
        job(
            synthetic_coco,
            "--epochs",
            "2",
            "--evaluation",
            "1",
            "--device",
            "cuda",
            "--save",
            str(tmp_path),
            batch_size=4,
        )
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["event"] == "end" and records[-1]["iteration"] == 8
    assert any(r["event"] == "eval" for r in records)
    ckpt = read_checkpoint(tmp_path / "epoch_1.pt")
    assert ckpt["scaler"]["scale"] > 0  # GradScaler state saved for an exact resume


def test_torchscript_traced_on_the_cpu_runs_on_the_gpu(model_repo, test_images, tmp_path):
    """Traced on the CPU, loaded onto the GPU (what Triton's libtorch backend does): buffers and
    constants follow the device, and the network's outputs agree with the CPU's."""
    x = torch.from_numpy(test_images)
    exported = torch.jit.load(model_repo / "ssd300_torchscript" / "1" / "model.pt", "cuda")
    with torch.no_grad():
        boxes, scores, classes = exported(x.cuda())
    assert boxes.device.type == scores.device.type == classes.device.type == "cuda"
    assert classes.dtype == torch.int32 and bool(torch.isfinite(boxes).all())
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # top-K, best first

    # the top-K order of near-equal scores may differ between devices: compare the raw outputs
    # of the same network, traced the same way
    torch.manual_seed(0)
    model = build_model()
    calibrate_random_model(model)
    export_torchscript(ServedSSD(model.eval(), raw=True).eval(), tmp_path / "raw.pt")
    with torch.no_grad():
        cpu_locs, cpu_logits = torch.jit.load(tmp_path / "raw.pt", "cpu")(x)
        torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
        try:
            locs, logits = torch.jit.load(tmp_path / "raw.pt", "cuda")(x.cuda())
        finally:
            torch.backends.cudnn.allow_tf32 = True
    torch.testing.assert_close(locs.cpu(), cpu_locs, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(logits.cpu(), cpu_logits, atol=1e-3, rtol=1e-3)
