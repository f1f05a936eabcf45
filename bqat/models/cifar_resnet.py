"""CIFAR ResNet-20/32/56 (He et al. 2016, sec. 4.2), registered into timm's registry.

Three stages of 3x3 basic blocks with 16/32/64 channels on 32x32 inputs. Shortcuts are
**option A**: identity, with stride-2 subsampling and zero-padded channels where the
shape changes (parameter-free, as in the paper's CIFAR experiments). Attribute names
follow timm's ResNet (conv1, bn1, act1, layerN, global_pool, fc) so the same block
split and first/last-layer rules apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by `stride`, zero-pad the new channels."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.shortcut = ShortcutA(in_chs, out_chs, stride) if (stride != 1 or in_chs != out_chs) else nn.Identity()

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 16, **_):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        # As timm's models carry it: the input size bqat's block checks probe with.
        self.pretrained_cfg = {"input_size": (in_chans, 32, 32), "num_classes": num_classes}
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        chs = [width, 2 * width, 4 * width]
        in_chs = width
        self.feature_info = []
        for i, out_chs in enumerate(chs):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_chs if j == 0 else out_chs, out_chs, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append({"num_chs": out_chs, "reduction": 2**i, "module": f"layer{i + 1}"})
            in_chs = out_chs
        self.num_features = in_chs
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, *_):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(depth: int, pretrained: bool, kwargs) -> CifarResNet:
    if pretrained:
        raise RuntimeError(f"no pretrained weights exist for the CIFAR resnet{depth}; use partner.checkpoint")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return CifarResNet(depth, **kwargs)


@register_model
def resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create(20, pretrained, kwargs)


@register_model
def resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create(32, pretrained, kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create(56, pretrained, kwargs)
