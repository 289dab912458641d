"""SSD300 with a truncated ResNet backbone, built the way the NVIDIA v1.1 code builds it.

The module tree (and therefore the state-dict keys) matches NVIDIA's published checkpoint:
``feature_extractor.feature_extractor.{0,1,4,5,6}`` (conv1, bn1, layer1..3), ``additional_blocks.i``
(conv1x1, BN, ReLU, conv3x3, BN, ReLU), ``loc.i`` / ``conf.i`` head convolutions without BatchNorm.
The network returns raw tensors; decoding and NMS live in ``ssdcore.postprocess``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from ssdcore.spec import SSD300 as SSD300_SPEC
from ssdcore.spec import SSD300Spec, spec_for

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Channels of the six feature maps per backbone (conv4_x output, then the five extra blocks).
FEATURE_CHANNELS: dict[str, tuple[int, ...]] = {
    "resnet18": (256, 512, 512, 256, 256, 128),
    "resnet34": (256, 512, 512, 256, 256, 256),
    "resnet50": (1024, 512, 512, 256, 256, 256),
    "resnet101": (1024, 512, 512, 256, 256, 256),
    "resnet152": (1024, 512, 512, 256, 256, 256),
}
EXTRA_MID_CHANNELS = (256, 256, 128, 128, 128)


class ResNetBackbone(nn.Module):
    """torchvision ResNet up to conv4_x (layer3), with conv4_x's stride set to 1.

    Output: (N, C, 38, 38) for a 300x300 input (stride 8). Nothing is downloaded here: ImageNet
    weights come from a local torchvision state-dict file (``weights_path``) or not at all.
    """

    def __init__(self, name: str = "resnet50", weights_path: str | Path | None = None) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
        resnet = getattr(torchvision.models, name)(weights=None)
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            resnet.load_state_dict(state)
        # conv1, bn1, relu, maxpool, layer1, layer2, layer3; layer4/avgpool/fc are not kept.
        self.feature_extractor = nn.Sequential(*list(resnet.children())[:7])
        first = self.feature_extractor[-1][0]
        # Remove the stride of conv4_x: wherever the first block strided, stride 1 instead.
        for conv in (first.conv1, first.conv2, first.downsample[0]):
            conv.stride = (1, 1)
        self.out_channels = FEATURE_CHANNELS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor(x)


def _extra_block(cin: int, mid: int, cout: int, last_two: bool) -> nn.Sequential:
    stride, padding = (1, 0) if last_two else (2, 1)
    return nn.Sequential(
        nn.Conv2d(cin, mid, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, cout, kernel_size=3, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SSD300(nn.Module):
    """SSD300: images (N, 3, 300, 300) normalised -> locs (N, 4, A), logits (N, num_classes, A).

    Output channel ``c = k * boxes_per_location + d`` of each head, flattened with a plain reshape,
    so the anchor index inside a level is ``d * H * W + y * W + x`` (``ssdcore.anchors`` order).
    """

    def __init__(self, backbone: ResNetBackbone, spec: SSD300Spec = SSD300_SPEC) -> None:
        super().__init__()
        self.spec = spec
        self.feature_extractor = backbone
        channels = backbone.out_channels
        self.additional_blocks = nn.ModuleList(
            _extra_block(channels[i], mid, channels[i + 1], last_two=i >= 3)
            for i, mid in enumerate(EXTRA_MID_CHANNELS)
        )
        nd = spec.boxes_per_location
        self.loc = nn.ModuleList(
            nn.Conv2d(c, n * 4, kernel_size=3, padding=1) for c, n in zip(channels, nd)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(c, n * spec.num_classes, kernel_size=3, padding=1)
            for c, n in zip(channels, nd)
        )
        self.frozen_modules: list[nn.Module] = []  # see freeze_backbone (not a submodule list)
        self._init_weights()

    def train(self, mode: bool = True) -> SSD300:
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()  # frozen BatchNorm keeps its statistics
        return self

    def _init_weights(self) -> None:
        # Xavier on every conv weight outside the backbone; biases keep PyTorch's default init.
        for module in (self.additional_blocks, self.loc, self.conf):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.feature_extractor(images)
        features = [x]
        for block in self.additional_blocks:
            x = block(x)
            features.append(x)
        n = images.shape[0]
        locs = torch.cat([h(f).reshape(n, 4, -1) for f, h in zip(features, self.loc)], dim=2)
        logits = torch.cat(
            [h(f).reshape(n, self.spec.num_classes, -1) for f, h in zip(features, self.conf)], dim=2
        )
        return locs, logits


def build_model(
    backbone: str = "resnet50",
    backbone_path: str | Path | None = None,
    num_classes: int = SSD300_SPEC.num_classes,
) -> SSD300:
    """The SSD300 of the recipe with ``num_classes`` outputs per anchor (classes + background).

    ``backbone_path``: a local torchvision ResNet state dict (``training.pretrained`` fetches
    torchvision's ImageNet files); None: a randomly initialised backbone.
    """
    return SSD300(ResNetBackbone(backbone, backbone_path), spec_for(num_classes))


# the backbone's stages from the head end, as torchvision counts trainable layers (its layer4 is
# not part of the truncated backbone): feature_extractor indices 6 = layer3 ... (0, 1) = conv1, bn1
BACKBONE_STAGES = (("layer3", (6,)), ("layer2", (5,)), ("layer1", (4,)), ("conv1", (0, 1)))


def freeze_backbone(model: SSD300, trainable_layers: int) -> list[str]:
    """Keep only the last ``trainable_layers`` backbone stages trainable (0: none, 4: all).

    Frozen stages stop getting gradients and their BatchNorm layers stay in eval mode (their
    running statistics are kept, as torchvision's FrozenBatchNorm2d does). Returns their names.
    """
    if not 0 <= trainable_layers <= len(BACKBONE_STAGES):
        raise ValueError(f"trainable backbone layers must be in 0..{len(BACKBONE_STAGES)}")
    frozen = []
    layers = model.feature_extractor.feature_extractor
    for name, indices in BACKBONE_STAGES[trainable_layers:]:
        for i in indices:
            layers[i].requires_grad_(False)
            model.frozen_modules.append(layers[i])
        frozen.append(name)
    model.train(model.training)
    return frozen


def smooth_noise_images(n: int, size: int = 300, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) images in [0, 1]: random colour fields, bilinearly upsampled from 8x8."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    return nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def calibrate_random_model(model: SSD300, images: torch.Tensor | None = None) -> None:
    """Make a randomly initialised model produce finite, unsaturated outputs.

    A random model's BatchNorm layers start at mean 0 / variance 1, so in eval mode activations
    grow layer after layer and the outputs saturate (every softmax exactly 1.0, boxes of 1e13).
    This sets the BatchNorm statistics from ``images`` (normalised, default smooth noise) and
    rescales each head so its outputs have a standard deviation of 1 (boxes) or 2 (logits). Good
    for smoke tests and demos of the plumbing; no substitute for training.
    """
    if images is None:
        spec = model.spec
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        images = (smooth_noise_images(4, spec.image_size) - mean) / std
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
    model.train()
    model(images)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()
    features = [model.feature_extractor(images)]
    for block in model.additional_blocks:
        features.append(block(features[-1]))
    for heads, target in ((model.loc, 1.0), (model.conf, 2.0)):
        for head, f in zip(heads, features):
            scale = target / head(f).std().clamp(min=1e-6)
            head.weight.mul_(scale)
            head.bias.mul_(scale)
    model.train(was_training)
