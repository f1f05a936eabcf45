"""The low-bit twin: which layers are quantized, at which bits, on an integer grid."""

import pytest
import timm
import torch
from omegaconf import OmegaConf

import bqat.models  # noqa: F401
from bqat.export.fixed import check_on_grid, freeze
from bqat.quant import QConv2d, QLinear, make_twin
from bqat.quant.twin import first_last_names


def cfgs(quant="lsq", w=2, a=2, first_last=8, per_channel=False):
    return OmegaConf.create({"name": quant, "per_channel": per_channel}), OmegaConf.create({"w": w, "a": a, "first_last": first_last})


@pytest.fixture(scope="module")
def fp():
    torch.manual_seed(0)
    return timm.create_model("resnet20", num_classes=10)


def qlayers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))}


def test_every_conv_and_linear_is_quantized_with_first_last_at_8_bits(fp):
    twin = make_twin(fp, *cfgs())
    twin(torch.randn(4, 3, 32, 32))
    layers = qlayers(twin)
    n_fp = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in fp.modules())
    assert len(layers) == n_fp == 20
    first, last = first_last_names(twin)
    assert (first, last) == ("conv1", "fc")
    for name, m in layers.items():
        expected = 8 if name in (first, last) else 2
        assert m.weight_quantizer.bits == m.input_quantizer.bits == expected, name


def test_twin_weights_are_integers_in_range(fp):
    """weight_q / step is an integer in [Qn, Qp] for every quantized layer."""
    for per_channel in (False, True):
        twin = make_twin(fp, *cfgs(per_channel=per_channel))
        twin(torch.randn(4, 3, 32, 32))
        for name, m in qlayers(twin).items():
            wq = m.weight_quantizer
            step = wq.step.reshape(wq.param_shape(m.weight))
            codes = wq(m.weight) / step
            assert torch.allclose(codes, codes.round(), atol=1e-4), name
            assert codes.min() >= wq.qn - 1e-4 and codes.max() <= wq.qp + 1e-4, name
            assert len(codes.round().unique()) <= 2**wq.bits


def grid_codes(q, xq, like):
    """Integer codes of a fake-quantized tensor by the export contract x_q = scale * (code - zero_point)."""
    scale, zp = q.scale_zero_point()
    shape = q.param_shape(like) if scale.dim() else ()
    return xq / scale.reshape(shape) + zp.reshape(shape)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("quant", ["lsq", "lsqplus", "pact", "dorefa", "ewgs"])
def test_every_quantizers_twin_is_on_its_integer_grid(fp, quant, per_channel):
    """Weights and input activations of every layer: code = x_q / scale + zero_point is an integer in
    [qn, qp] (DoReFa: its normalised [-1, 1] grid, zero_point L/2); W2A4, so the two bit-widths differ."""
    twin = make_twin(fp, *cfgs(quant=quant, w=2, a=4, per_channel=per_channel))
    seen = {}
    hooks = [m.input_quantizer.register_forward_hook(lambda q, i, o, n=n: seen.__setitem__(n, (q, i[0], o)))
             for n, m in qlayers(twin).items()]
    twin(torch.randn(4, 3, 32, 32))
    for h in hooks:
        h.remove()
    edges = first_last_names(twin)
    assert len(seen) == 20
    for name, m in qlayers(twin).items():
        wq = m.weight_quantizer
        assert wq.per_channel == per_channel and (wq.bits, m.input_quantizer.bits) == ((8, 8) if name in edges else (2, 4))
        for q, x, xq in ((wq, m.weight, wq(m.weight)), seen[name]):
            codes = grid_codes(q, xq.detach(), x)
            assert torch.allclose(codes, codes.round(), atol=2e-3), (quant, name, q.kind)
            assert codes.min() >= q.qn - 1e-3 and codes.max() <= q.qp + 1e-3, (quant, name, q.kind)
            # bqat-export freezes exactly this grid and checks the quantizer's outputs against it
            check_on_grid(freeze(q, name), q, x.detach(), xq.detach(), name)


def test_first_last_fp_policy_keeps_float_layers(fp):
    twin = make_twin(fp, *cfgs(first_last="fp"))
    assert type(twin.conv1) is torch.nn.Conv2d and type(twin.fc) is torch.nn.Linear
    assert isinstance(twin.layer1[0].conv1, QConv2d)
    same = make_twin(fp, *cfgs(first_last="same"))
    assert same.conv1.weight_quantizer.bits == 2


def test_twin_starts_from_fp_weights_and_leaves_fp_untouched(fp):
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    twin = make_twin(fp, *cfgs())
    assert torch.equal(twin.layer2[0].conv1.weight, fp.layer2[0].conv1.weight)
    assert twin.layer2[0].conv1.weight is not fp.layer2[0].conv1.weight
    twin(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in fp.state_dict().items())


def test_quant_none_is_a_float_copy(fp):
    twin = make_twin(fp, *cfgs(quant="none"))
    assert not qlayers(twin)
    x = torch.randn(2, 3, 32, 32)
    fp.eval(), twin.eval()
    assert torch.equal(twin(x), fp(x))


def test_per_channel_auto_means_per_channel_weights_only_in_depthwise_networks(fp):
    """quant.per_channel=auto: every weight step per output channel in a network with depthwise
    convs (MobileNetV2), one step per tensor in a ResNet; other values are refused in one line."""
    from bqat.errors import UserError
    from bqat.quant.twin import weights_per_channel

    torch.manual_seed(0)
    mbv2 = timm.create_model("mobilenetv2_035", num_classes=10)
    twin = make_twin(mbv2, *cfgs(per_channel="auto"))
    twin(torch.randn(2, 3, 32, 32))
    edges = first_last_names(twin)
    for name, m in qlayers(twin).items():
        if name not in edges:
            assert m.weight_quantizer.step.numel() == m.weight.shape[0] > 1, name
    resnet_twin = make_twin(fp, *cfgs(per_channel="auto"))
    resnet_twin(torch.randn(2, 3, 32, 32))
    assert all(m.weight_quantizer.step.numel() == 1 for m in qlayers(resnet_twin).values())
    assert weights_per_channel(True, fp) and not weights_per_channel(False, mbv2)
    with pytest.raises(UserError, match="quant.per_channel must be true, false or auto"):
        weights_per_channel("sometimes", fp)
