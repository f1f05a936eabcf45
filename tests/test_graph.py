"""The traced module graph (conv -> BatchNorm pairs, residual points) and the twin option
twin.residual_bits that puts quantizers on the residual branches and stream."""

import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch import nn

import bqat.models  # noqa: F401  (registers the CIFAR ResNets)
from bqat.config import validate
from bqat.errors import UserError
from bqat.models.graph import conv_bn_pairs, residual_points
from bqat.quant import add_residual_quantizers, make_twin, residual_bits_of, twin_from_config
from bqat.quant.modules import output_quantizer

LSQ = OmegaConf.create({"name": "lsq", "per_channel": False})
W2A2 = OmegaConf.create({"w": 2, "a": 2, "first_last": 8})


class Tangled(nn.Module):
    """Three BatchNorms, one of which really is its conv's: the others read a tensor that is
    also read elsewhere, or a pooling."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.pool, self.bn2 = nn.Conv2d(4, 4, 1), nn.AvgPool2d(1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        x = self.bn1(y) + y
        x = self.bn2(self.pool(self.conv2(x)))
        return self.bn3(self.conv3(x))


def test_only_a_batchnorm_that_directly_and_only_follows_a_conv_is_paired():
    assert conv_bn_pairs(Tangled()) == [("conv3", "bn3")]
    pairs = conv_bn_pairs(timm.create_model("resnet20", num_classes=10))
    assert len(pairs) == 19 and ("layer2.0.conv1", "layer2.0.bn1") in pairs and ("conv1", "bn1") in pairs


def test_residual_points_of_cifar_and_timm_resnets():
    points = residual_points(timm.create_model("resnet20", num_classes=10))
    branches = {p.module: p.conv for p in points if p.conv}
    assert branches == {f"layer{s}.{b}.bn2": f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)}
    # the stream: the stem's output (the first shortcut reads it) and every block's output
    assert {p.module for p in points if not p.conv} == {"act1", *(f"layer{s}.{b}.act2" for s in (1, 2, 3) for b in range(3))}

    points = residual_points(timm.create_model("resnet18", num_classes=10))
    branches = {p.module for p in points if p.conv}
    assert {"layer1.0.bn2", "layer2.0.downsample.1", "layer4.1.bn2"} <= branches and len(branches) == 11
    assert {p.module for p in points if not p.conv} == {"maxpool", *(f"layer{s}.{b}.act2" for s in (1, 2, 3, 4) for b in (0, 1))}


def test_twin_residual_bits_trains_quantizers_on_branch_and_stream(compose_cfg):
    cfg = compose_cfg("twin.residual_bits=8")
    fp = timm.create_model("resnet20", num_classes=10, in_chans=1)
    twin = twin_from_config(fp, cfg).train()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    twin(x)  # initialises the quantizers, as training's first batch does
    quantized = {n for n, m in twin.named_modules() if output_quantizer(m) is not None}
    assert len(quantized) == 19 and {"layer1.0.bn2", "act1", "layer3.2.act2"} <= quantized
    assert "layer1.0.bn2.output_quantizer.step" in twin.state_dict()
    twin(x).sum().backward()
    q = twin.get_submodule("layer2.1.bn2").output_quantizer
    assert q.bits == 8 and q.signed and q.step.grad is not None and q.step.grad.abs() > 0
    with torch.no_grad():  # the block output is on its 8-bit grid (unsigned after the ReLU)
        out = []
        twin.layer1[0].act2.register_forward_hook(lambda _m, _i, o: out.append(o))  # after the quantizer's hook
        twin.eval()(x)
        codes = out[0] / twin.layer1[0].act2.output_quantizer.step
        assert (codes - codes.round()).abs().max() < 1e-4 and codes.min() >= 0 and codes.round().max() <= 255

    plain = twin_from_config(fp, compose_cfg("twin.residual_bits=null"))
    assert not any(output_quantizer(m) is not None for m in plain.modules()) and residual_bits_of(plain) is None
    assert residual_bits_of(twin) == 8


def test_twin_residual_bits_auto_is_8_bits_on_a_resnet_and_nothing_without_residual_adds(compose_cfg, caplog):
    cfg = compose_cfg()  # train.yaml's default
    assert cfg.twin.residual_bits == "auto"
    validate(cfg)
    fp = timm.create_model("resnet20", num_classes=10, in_chans=1)
    auto, eight = twin_from_config(fp, cfg), twin_from_config(fp, compose_cfg("twin.residual_bits=8"))
    assert residual_bits_of(auto) == 8 and auto.state_dict().keys() == eight.state_dict().keys()
    # the paper's table configs keep the paper's twin
    assert compose_cfg("experiment=cifar10_resnet20").twin.residual_bits is None

    flat = make_twin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)), LSQ, W2A2)
    with caplog.at_level("INFO"):
        assert add_residual_quantizers(flat, LSQ, "auto") == []
    assert residual_bits_of(flat) is None and "no quantized conv of the model feeds a residual add" in caplog.text


class Untraceable(nn.Module):
    """A residual block whose forward branches on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x)) + x
        return x


def test_twin_residual_bits_auto_on_an_untraceable_model_warns_and_adds_nothing(caplog):
    twin = make_twin(Untraceable(), LSQ, OmegaConf.create({"w": 2, "a": 2, "first_last": "same"}))
    with caplog.at_level("WARNING"):
        assert add_residual_quantizers(twin, LSQ, "auto") == []
    assert "torch.fx cannot read the model's residual adds" in caplog.text and residual_bits_of(twin) is None
    with pytest.raises(UserError, match="twin.residual_bits needs the model's residual adds"):
        add_residual_quantizers(twin, LSQ, 8)


def test_twin_residual_bits_errors_are_one_line(compose_cfg):
    flat = make_twin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)), LSQ, W2A2)
    with pytest.raises(UserError, match=r"twin.residual_bits=8, but no quantized conv of the model feeds a residual add"):
        add_residual_quantizers(flat, LSQ, 8)
    with pytest.raises(UserError, match=r"twin.residual_bits must be an integer from 2 to 8"):
        validate(compose_cfg("twin.residual_bits=1"))
    with pytest.raises(UserError, match=r"twin.residual_bits must be an integer from 2 to 8 or auto, got 'yes'"):
        validate(compose_cfg("twin.residual_bits=yes"))
