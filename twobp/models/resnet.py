"""ResNet with bottleneck blocks, its convolutions and classifier built from twobp modules.

The bottleneck ResNet of He et al. 2015 (arXiv 1512.03385) in its "v1.5" form (the stride
sits on the 3x3 convolution, as in torchvision): per block 1x1 -> 3x3 -> 1x1 (x4 channels)
convolutions, each followed by BatchNorm, ReLU after the first two and after the residual
sum; a 1x1 strided projection on the shortcut where the shape changes.

Blocks (see :mod:`twobp.models.base`), ``x`` [B, C, H, W] images -> [B, classes] logits::

    stem     conv (7x7/2 + 3x3/2 max-pool for "imagenet", 3x3/1 for "cifar") -> BN -> ReLU
    blocks   sum(layers) bottlenecks; stage i has width * 2**i channels inside, 4x outside
    head     global average pool -> TwoBPLinear(channels, classes)

BatchNorm is torch's own ``nn.BatchNorm2d``, not a twobp module: its gamma/beta gradients
are computed by autograd during p1, next to dX, and only the convolutions' and the
classifier's dW are deferred to p2. BN's parameters are 0.05% of ResNet-152's and its
weight gradient is a per-channel reduction that p1 walks over anyway, so deferring it would
save little; a twobp BatchNorm can replace it later without changing the model's blocks.

In training mode BatchNorm normalises with the statistics of the batch it is given. A
pipeline feeds it micro-batches, so the normalisation (and the running averages, updated
once per micro-batch) differ from one large batch's: micro-batched training is a slightly
different computation, not a reordering of the same one. Equivalence tests therefore use the
LLaMa/BERT models, or a ResNet in eval mode (running statistics, fixed per step).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data import synthetic_images
from ..nn.conv import TwoBPConv2d
from ..nn.linear import TwoBPLinear
from .base import TwoBPModel, check_positive

__all__ = ["PRESETS", "ResNet", "ResNetConfig"]

EXPANSION = 4
"""A bottleneck's output has EXPANSION times the channels of its 3x3 convolution."""


@dataclass(kw_only=True)
class ResNetConfig:
    """Shape of a bottleneck ResNet."""

    layers: tuple[int, ...] = (1, 1, 1, 1)
    """Bottleneck blocks per stage; ResNet-50 is (3, 4, 6, 3)."""
    width: int = 8
    """Channels of the stem and inside stage 0's bottlenecks (64 in ResNet-50); doubled per stage."""
    num_classes: int = 10
    """Classifier outputs."""
    image_size: int = 32
    """Height and width of the input images (for ``example_batch`` and the FLOP count)."""
    in_channels: int = 3
    """Channels of the input images."""
    stem: str = "cifar"
    """"imagenet": 7x7 stride-2 conv and 3x3 stride-2 max-pool; "cifar": 3x3 stride-1 conv only."""
    zero_init_residual: bool = False
    """Start each block's last BN at gamma 0, so blocks begin as identities (Goyal et al. 2017)."""
    bn_eps: float = 1e-5
    """BatchNorm epsilon."""
    bn_momentum: float = 0.1
    """BatchNorm running-average momentum."""

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if not self.layers or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in self.layers):
            raise ValueError(f"ResNetConfig.layers must be a non-empty sequence of positive ints, got {self.layers!r}")
        check_positive(self, "width", "num_classes", "image_size", "in_channels")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNetConfig.stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if self.bn_eps <= 0:
            raise ValueError(f"ResNetConfig.bn_eps must be > 0, got {self.bn_eps!r}")


PRESETS: dict[str, dict] = {
    # CPU demo: 32x32 images, 10 classes, 0.13 M parameters
    "tiny": dict(layers=(1, 1, 1, 1), width=8, num_classes=10, image_size=32, stem="cifar"),
    "small": dict(layers=(2, 2, 2, 2), width=16, num_classes=100, image_size=64, stem="cifar"),
    # CPU pipeline benchmarks (bench/compare_torch_pipelining.py): 3.5 M parameters, 64x64 images
    "cpu": dict(layers=(2, 2, 2, 2), width=32, num_classes=100, image_size=64, stem="cifar"),
    "50": dict(layers=(3, 4, 6, 3), width=64, num_classes=1000, image_size=224, stem="imagenet"),
    "101": dict(layers=(3, 4, 23, 3), width=64, num_classes=1000, image_size=224, stem="imagenet"),
    # ResNet-152, the 2BP paper's size
    "152": dict(layers=(3, 8, 36, 3), width=64, num_classes=1000, image_size=224, stem="imagenet"),
}


def _conv_macs(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int, int]:
    """Multiply-adds of ``conv`` on an [*, C, h, w] input, and the output's height and width."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return conv.out_channels * ho * wo * (conv.in_channels // conv.groups) * kh * kw, ho, wo


class Stem(nn.Module):
    """conv -> BN -> ReLU (-> max-pool for the ImageNet stem)."""

    def __init__(self, cfg: ResNetConfig, *, device=None, dtype=None):
        super().__init__()
        k, s, p = (7, 2, 3) if cfg.stem == "imagenet" else (3, 1, 1)
        self.conv = TwoBPConv2d(cfg.in_channels, cfg.width, k, stride=s, padding=p, bias=False,
                                device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(cfg.width, eps=cfg.bn_eps, momentum=cfg.bn_momentum, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if cfg.stem == "imagenet" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))  # [B, width, H', W']

    def macs(self, h: int, w: int) -> tuple[int, int, int]:
        macs, h, w = _conv_macs(self.conv, h, w)
        if isinstance(self.pool, nn.MaxPool2d):
            h, w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
        return macs, h, w


class Bottleneck(nn.Module):
    """relu(x' + BN(conv1x1(relu(BN(conv3x3/s(relu(BN(conv1x1(x))))))))), x' the shortcut."""

    def __init__(self, in_ch: int, mid: int, stride: int, cfg: ResNetConfig, *, device=None, dtype=None):
        super().__init__()
        out = mid * EXPANSION
        conv = dict(bias=False, device=device, dtype=dtype)
        bn = dict(eps=cfg.bn_eps, momentum=cfg.bn_momentum, device=device, dtype=dtype)
        self.conv1 = TwoBPConv2d(in_ch, mid, 1, **conv)
        self.bn1 = nn.BatchNorm2d(mid, **bn)
        self.conv2 = TwoBPConv2d(mid, mid, 3, stride=stride, padding=1, **conv)
        self.bn2 = nn.BatchNorm2d(mid, **bn)
        self.conv3 = TwoBPConv2d(mid, out, 1, **conv)
        self.bn3 = nn.BatchNorm2d(out, **bn)
        self.act = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_ch != out:
            self.downsample = nn.Sequential(TwoBPConv2d(in_ch, out, 1, stride=stride, **conv),
                                            nn.BatchNorm2d(out, **bn))

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.bn1(self.conv1(x)))  # [B, mid, H, W]
        y = self.act(self.bn2(self.conv2(y)))  # [B, mid, H/s, W/s]
        y = self.bn3(self.conv3(y))  # [B, 4 mid, H/s, W/s]
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(y + shortcut)

    def macs(self, h: int, w: int) -> tuple[int, int, int]:
        m1, h1, w1 = _conv_macs(self.conv1, h, w)
        m2, h2, w2 = _conv_macs(self.conv2, h1, w1)
        m3, _, _ = _conv_macs(self.conv3, h2, w2)
        md = _conv_macs(self.downsample[0], h, w)[0] if self.downsample is not None else 0
        return m1 + m2 + m3 + md, h2, w2


class ClassifierHead(nn.Module):
    """Global average pool and a twobp linear classifier."""

    def __init__(self, channels: int, num_classes: int, *, device=None, dtype=None):
        super().__init__()
        self.fc = TwoBPLinear(channels, num_classes, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))  # [B, C, H, W] -> [B, C] -> [B, classes]

    def macs(self, h: int, w: int) -> tuple[int, int, int]:
        return self.fc.in_features * self.fc.out_features, 1, 1


class ResNet(TwoBPModel):
    """Bottleneck ResNet (see the module docstring)."""

    name = "resnet"

    def __init__(self, config: ResNetConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.stem = Stem(config, **kw)
        layers, in_ch = [], config.width
        for stage, n in enumerate(config.layers):
            mid = config.width * 2**stage
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(Bottleneck(in_ch, mid, stride, config, **kw))
                in_ch = mid * EXPANSION
        self.layers = nn.ModuleList(layers)
        self.head = ClassifierHead(in_ch, config.num_classes, **kw)
        self.reset_parameters()

    def init_parameter(self, name: str, module: nn.Module, attr: str, p: Tensor) -> None:
        """torchvision's init: Kaiming-normal convs (fan_out), BN at gamma 1 and beta 0 (gamma 0
        on each bottleneck's last BN with ``zero_init_residual``), the classifier as nn.Linear."""
        if isinstance(module, TwoBPConv2d):
            if attr == "weight":
                nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.zeros_(p)
        elif isinstance(module, nn.BatchNorm2d):
            zero = attr == "weight" and self.config.zero_init_residual and name.endswith("bn3.weight")
            nn.init.ones_(p) if attr == "weight" and not zero else nn.init.zeros_(p)
        elif attr == "weight":  # the classifier: nn.Linear's own init
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        else:
            bound = 1 / math.sqrt(module.in_features)
            nn.init.uniform_(p, -bound, bound)

    def blocks(self) -> list[nn.Module]:
        return [self.stem, *self.layers, self.head]

    def forward_macs(self) -> int:
        """Multiply-adds of one image's forward through the convolutions and the classifier."""
        h = w = self.config.image_size
        total = 0
        for block in self.blocks():
            macs, h, w = block.macs(h, w)
            total += macs
        return total

    def flops_per_sample(self) -> int:
        """3 x forward FLOPs (2 per multiply-add): backward costs dX + dW, each one forward.

        Convolutions and the classifier only; BatchNorm, ReLU, pooling and the residual sums
        (under 1% of the total) are left out, as in the usual ResNet FLOP counts.
        """
        return 3 * 2 * self.forward_macs()

    def example_batch(self, batch_size: int, *, generator: torch.Generator | None = None,
                      device=None) -> tuple[Tensor, Tensor]:
        """Gaussian images [B, C, H, W] in the model's dtype and random labels [B] (synthetic)."""
        c = self.config
        x, y = synthetic_images(batch_size, c.in_channels, c.image_size, c.num_classes, generator=generator)
        return x.to(device, self.head.fc.weight.dtype), y.to(device)
