"""Schedules `sampled` and `single`, and the cost rules of a step: the LP prefix runs once,
the frozen partner gets no weight gradients (only input gradients flow through it)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bqat.models import default_boundaries, split_blocks
from bqat.replace import SCHEDULES, prefix_path, single_path
from test_replace import batch, build


def block_params(model, block):
    return [p for name in block.names for p in model.get_submodule(name).parameters()]


def test_sampled_draws_every_prefix_path_reproducibly():
    hybrid = build(schedule="sampled")
    n = hybrid.n
    draws = [hybrid.schedule.paths(n, torch.Generator().manual_seed(0))[0] for _ in range(3)]
    assert len(set(draws)) == 1  # same generator state, same path
    g = torch.Generator().manual_seed(1)
    seen = [p for _ in range(60) for p in hybrid.schedule.paths(n, g)]
    assert len(seen) == 60  # exactly one path per step
    assert set(seen) == {prefix_path(k, n) for k in range(1, n)}


def test_sampled_step_uses_one_mixed_path_in_the_loss():
    hybrid = build(schedule="sampled")
    x, y = batch()
    loss, logs = hybrid.training_step(x, y)
    mixed = [k for k in logs if k.startswith("ce/") and k != "ce/lp"]
    assert len(mixed) == 1
    assert loss.item() == (logs["ce/lp"] + logs[mixed[0]]).item()


def test_sampled_can_draw_from_single_paths():
    from omegaconf import OmegaConf

    schedule = SCHEDULES["sampled"](OmegaConf.create({"name": "sampled", "pool": "single", "k": None}))
    g = torch.Generator().manual_seed(0)
    assert {p for _ in range(60) for p in schedule.paths(3, g)} == {"qff", "fqf", "ffq"}


def test_single_path_logits_equal_hand_composition():
    """z = F_n .. F_{k+1}(Q_k(F_{k-1} .. F_1(x)))."""
    hybrid = build(schedule="single")
    x, _ = batch()
    n = hybrid.n
    assert hybrid.schedule.paths(n, hybrid.generator) == [single_path(k, n) for k in range(1, n + 1)]
    out = hybrid.run_paths(x, [single_path(k, n) for k in range(1, n + 1)])
    lp = split_blocks(hybrid.twin, default_boundaries(hybrid.partner))
    fp = split_blocks(hybrid.partner, default_boundaries(hybrid.partner))
    for k in range(1, n + 1):
        h = x
        for i in range(n):
            h = (lp if i == k - 1 else fp)[i](h)
        assert torch.equal(out[single_path(k, n)], h)


def test_single_path_k_gives_gradient_to_block_k_only():
    hybrid = build(schedule="single")
    x, y = batch()
    n = hybrid.n
    for k in range(1, n + 1):
        hybrid.twin.zero_grad(set_to_none=True)
        z = hybrid.run_paths(x, [single_path(k, n)])[single_path(k, n)]
        F.cross_entropy(z, y).backward()
        for i, block in enumerate(hybrid.lp_blocks):
            params = block_params(hybrid.twin, block)
            if i == k - 1:
                assert all(p.grad is not None for p in params) and sum(p.grad.abs().sum() for p in params) > 0
            else:
                assert all(p.grad is None for p in params), (k, i)
        assert all(p.grad is None for p in hybrid.partner.parameters())


def test_single_schedule_with_one_k():
    from omegaconf import OmegaConf

    schedule = SCHEDULES["single"](OmegaConf.create({"name": "single", "k": 2}))
    assert schedule.paths(3, torch.Generator()) == ["fqf"]


class ConvLog(TorchDispatchMode):
    """Records every convolution forward (its weight) and backward (which gradients it computes)."""

    def __init__(self):
        super().__init__()
        self.forward, self.backward = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.forward.append(args[1].shape)
        elif func is torch.ops.aten.convolution_backward.default:
            self.backward.append((args[2].shape, tuple(args[-1])))  # (weight shape, output_mask)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch_paths", [True, False])
def test_prefix_step_runs_each_lp_conv_once_and_no_partner_weight_gradient(batch_paths):
    """The cost rules behind the overhead budget: per step, every LP conv runs forward and
    backward once (prefix reused, gradients of all paths summed before the LP backward), and
    the partner's convs compute input gradients only. With batch_paths every partner block
    F_2..F_n runs once (all the paths entering it in one batch); without, once per path."""
    hybrid = build(schedule="prefix", model="resnet18")
    hybrid.batch_paths = batch_paths
    x, y = batch()
    n = hybrid.n
    lp_convs = [sum(isinstance(m, torch.nn.Conv2d) for name in b.names for m in hybrid.twin.get_submodule(name).modules()) for b in hybrid.lp_blocks]
    fp_convs = [sum(isinstance(m, torch.nn.Conv2d) for name in b.names for m in hybrid.partner.get_submodule(name).modules()) for b in hybrid.fp_blocks]
    log = ConvLog()
    with log:
        loss, _ = hybrid.training_step(x, y)
        loss.backward()
    if batch_paths:
        suffix_convs = sum(fp_convs[1:])  # F_2..F_n, once each
        assert hybrid.partner_block_calls == n - 1
    else:
        suffix_convs = sum(sum(fp_convs[k:]) for k in range(1, n))  # F_{k+1}..F_n for k = 1..n-1
        assert hybrid.partner_block_calls == n * (n - 1) // 2
    assert len(log.forward) == sum(lp_convs) + suffix_convs
    weight_grads = [m for _, m in log.backward if m[1]]
    input_only = [m for _, m in log.backward if not m[1]]
    assert len(weight_grads) == sum(lp_convs)  # one backward per LP conv, none for the partner
    assert len(input_only) == suffix_convs and all(m[0] for m in input_only)
