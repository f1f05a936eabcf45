"""bqat as a library: BlockReplacement wraps any twin (hand-written quantized modules, Brevitas,
bqat's own) cut by module names or by a callable, inside the user's own loop."""

import copy
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bqat import BlockReplacement, make_twin
from bqat.models.split import Block
from bqat.quant import Quantizer


# --- a twin of hand-written quantized modules, not bqat's ------------------------------------

def fake_quant(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Symmetric per-tensor fake quantization with a straight-through round."""
    scale = x.detach().abs().amax().clamp_min(1e-8) / (2 ** (bits - 1) - 1)
    q = x / scale
    return (q + (q.round() - q).detach()) * scale


class MyQConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(fake_quant(x), fake_quant(self.weight), self.bias, self.stride, self.padding)


class MyQLinear(nn.Linear):
    def forward(self, x):
        return F.linear(fake_quant(x), fake_quant(self.weight), self.bias)


def small_net(conv=nn.Conv2d, linear=nn.Linear, act=nn.ReLU, width=16) -> nn.Sequential:
    """stem | stage1 | stage2 | head, all modules: module names alone cut it."""
    def stage(cin, cout, stride):
        return nn.Sequential(conv(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), act())

    return nn.Sequential(OrderedDict(stem=stage(3, 8, 1), stage1=stage(8, width, 2), stage2=stage(width, width, 2),
                                     head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear(width, 10))))


NAMES = [["stem", "stage1"], ["stage2"], ["head"]]


def partner_net(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    net = small_net(**kwargs)
    with torch.no_grad():  # running statistics that differ from a batch's
        net.train()(torch.randn(16, 3, 16, 16))
    return net.eval()


def twin_of(partner, **layers):
    twin = small_net(**layers)
    twin.load_state_dict(partner.state_dict(), strict=False)
    return twin


def handwritten():
    partner = partner_net()
    return twin_of(partner, conv=MyQConv, linear=MyQLinear), partner, NAMES


def brevitas_twin():
    qnn = pytest.importorskip("brevitas.nn")
    partner = partner_net()
    twin = twin_of(partner, conv=partial(qnn.QuantConv2d, weight_bit_width=4), linear=partial(qnn.QuantLinear, weight_bit_width=4),
                   act=partial(qnn.QuantReLU, bit_width=4))
    return twin, partner, NAMES


def resnet_blocks(m):
    """torchvision's ResNet flattens in forward: a callable cuts it."""
    return [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1), m.layer2, m.layer3,
            nn.Sequential(m.layer4, m.avgpool, nn.Flatten(1), m.fc)]


def tv_resnet():
    """torchvision's ResNet class (ResNet-10: one BasicBlock per stage, to stay fast)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()


def callable_blocks():
    partner = tv_resnet()
    return make_twin(partner, quant="lsq", bits=2), partner, resnet_blocks


def block_params(block):
    if isinstance(block, Block):
        return [p for n in block.names for p in block.model.get_submodule(n).parameters()]
    return list(block.parameters())


def batch(n=4, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("make", [handwritten, brevitas_twin, callable_blocks], ids=["handwritten", "brevitas", "callable"])
def test_one_step_trains_every_twin_block_and_leaves_the_partner(make):
    twin, partner, blocks = make()
    x, y = batch()
    br = BlockReplacement(twin, partner, blocks, loss={"w_kd": 1.0}, example_input=x).train()
    before = copy.deepcopy(partner.state_dict())
    opt = torch.optim.SGD(br.parameters(), lr=0.1, momentum=0.9)
    loss, logs = br.training_step(x, y)
    mixed = [f"ce/{'q' * k}{'f' * (br.n - k)}" for k in range(1, br.n)]
    assert br.n == len(blocks(partner) if callable(blocks) else blocks) and {"ce/lp", *mixed, "kd", "loss"} <= set(logs)
    loss.backward()
    for k, block in enumerate(br.lp_blocks, 1):
        params = block_params(block)
        assert params and all(p.grad is not None for p in params), f"twin block {k}"
        assert sum(float(p.grad.abs().sum()) for p in params) > 0, f"twin block {k}"
    opt.step()
    assert not partner.training and all(p.grad is None and not p.requires_grad for p in partner.parameters())
    assert all(torch.equal(v, partner.state_dict()[k]) for k, v in before.items())  # running statistics included
    assert {id(p) for p in br.parameters()} == {id(p) for p in twin.parameters()}

    # The prefix paths equal the blocks run by hand (the user's own cut of each model).
    br.eval()
    out = br.evaluate(x)
    lp, fp = (blocks(m) if callable(blocks) else [Block(m, tuple(n), head=False) for n in blocks] for m in (twin, partner))
    with torch.no_grad():
        for k in range(1, br.n):
            h = x
            for block in lp[:k] + fp[k:]:
                h = block(h)
            assert torch.equal(out[f"mixed_{k}"], h)
        assert torch.equal(out["lp"], twin(x))


def test_the_check_leaves_the_twin_as_it_was():
    """Probing the twin would initialise its quantizers; only a copy runs."""
    partner = partner_net()
    twin = make_twin(partner, quant="lsq", bits=2)
    before = copy.deepcopy(twin.state_dict())
    BlockReplacement(twin, partner, NAMES, example_input=(3, 16, 16))
    assert not any(m.initialized for m in twin.modules() if isinstance(m, Quantizer))
    assert twin.state_dict().keys() == before.keys()
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in before.items() if torch.is_tensor(v))


def test_plain_arguments_take_conf_defaults():
    partner = partner_net()
    twin = make_twin(partner, quant={"name": "pact"}, bits={"w": 3, "a": 4})
    q = twin.stage1[0]
    assert type(q.weight_quantizer).__name__ == "PACT" and (q.weight_quantizer.bits, q.input_quantizer.bits) == (3, 4)
    assert (twin.stem[0].weight_quantizer.bits, twin.head[2].weight_quantizer.bits) == (8, 8)  # bits.first_last
    br = BlockReplacement(twin, partner, NAMES, schedule="sampled", loss={"w_kd": 1.0})
    assert br.schedule_cfg.pool == "prefix" and br.loss_cfg.w_kd == 1.0 and br.loss_cfg.T == 4.0
    assert br.loss_cfg.get("w_mix") == 1.0
    with pytest.raises(ValueError, match="loss has no key 'wkd'"):
        BlockReplacement(twin, partner, NAMES, loss={"wkd": 1.0})


def bad(**kwargs):
    partner = partner_net()
    twin = kwargs.pop("twin", None) or twin_of(partner, conv=MyQConv, linear=MyQLinear)
    return partial(BlockReplacement, twin, partner, example_input=(3, 16, 16), **kwargs), twin, partner


@pytest.mark.parametrize("case, match", [
    ("other architecture", r"block 1: the twin's output has shape \(2, 32, 8, 8\), the partner's \(2, 16, 8, 8\)"),
    ("no such module", r"block 1: the twin \(Sequential\) has no module 'stage9'"),
    ("a gap", r"block 2 of the partner does not run on the output of block 1"),
    ("a skip", r"chaining the 3 blocks of the partner \(Sequential\) does not reproduce its forward"),
    ("uneven callable", r"gives the twin 3 blocks and the partner 4"),
    ("no flatten", r"block 4 of the partner does not run on the output of block 3"),
    ("the same model", r"the twin shares parameter 'stem.0.weight' with the partner"),
])
def test_bad_blocks_or_models_are_one_clear_value_error(case, match):
    if case == "other architecture":
        make, *_ = bad(twin=small_net(conv=MyQConv, linear=MyQLinear, width=32))
        blocks = NAMES
    elif case == "no such module":
        make, *_ = bad()
        blocks = [["stem", "stage9"], ["stage2"], ["head"]]
    elif case == "a gap":
        make, *_ = bad()
        blocks = [["stem"], ["stage2"], ["head"]]
    elif case == "a skip":
        make, *_ = bad()
        blocks = [["stem"], ["stage1"], ["head"]]
    elif case == "uneven callable":
        make, twin, partner = bad()
        blocks = lambda m: list(m.children())[: 4 if m is partner else 3]  # noqa: E731
    elif case == "no flatten":
        partner = tv_resnet()
        make = partial(BlockReplacement, make_twin(partner, "lsq", 2), partner, example_input=(3, 16, 16))
        blocks = lambda m: [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1), m.layer2, m.layer3, nn.Sequential(m.layer4, m.avgpool, m.fc)]  # noqa: E731
    else:
        partner = partner_net()
        make, blocks = partial(BlockReplacement, partner, partner), NAMES
    with pytest.raises(ValueError, match=match) as err:
        make(blocks)
    assert "\n" not in str(err.value)
