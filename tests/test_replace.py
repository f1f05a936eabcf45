"""One BlockReplacement step: frozen partner, gradients to every LP block, exact mixed paths."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import bqat.models  # noqa: F401
from bqat.models import default_boundaries, split_blocks
from bqat.quant import make_twin
from bqat.replace import BlockReplacement


def build(schedule="prefix", w_kd=0.0, model="resnet20"):
    torch.manual_seed(0)
    fp = timm.create_model(model, num_classes=10)
    # Non-trivial running statistics, so eval-mode BN differs from batch statistics.
    fp.train()
    with torch.no_grad():
        for _ in range(2):
            fp(torch.randn(16, 3, 32, 32))
    fp.eval()
    twin = make_twin(fp, OmegaConf.create({"name": "lsq", "per_channel": False}), OmegaConf.create({"w": 2, "a": 2, "first_last": 8}))
    twin(torch.randn(8, 3, 32, 32))  # initialise step sizes
    loss_cfg = OmegaConf.create({"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": w_kd, "T": 2.0, "w_mp_kd": 0.0})
    hybrid = BlockReplacement(twin, fp, default_boundaries(fp), OmegaConf.create({"name": schedule}), loss_cfg)
    return hybrid.train()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_partner_is_frozen_and_in_eval_mode():
    hybrid = build(w_kd=1.0)
    before = copy.deepcopy(hybrid.partner.state_dict())
    opt = torch.optim.SGD(hybrid.twin.parameters(), lr=0.1)
    x, y = batch()
    loss, _ = hybrid.training_step(x, y)
    loss.backward()
    opt.step()
    assert not hybrid.partner.training
    assert all(p.grad is None and not p.requires_grad for p in hybrid.partner.parameters())
    after = hybrid.partner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included


def test_every_lp_block_gets_gradient_from_mixed_paths():
    hybrid = build()
    x, y = batch()
    loss, _ = hybrid.training_step(x, y)
    loss.backward()
    for block in hybrid.lp_blocks:
        params = [p for name in block.names for p in hybrid.twin.get_submodule(name).parameters()]
        assert params and all(p.grad is not None for p in params)
        assert sum(p.grad.abs().sum() for p in params) > 0


def test_mixed_path_logits_equal_hand_composition():
    """z_k = F_n ... F_{k+1}(Q_k ... Q_1(x))."""
    hybrid = build()
    x, _ = batch()
    n = hybrid.n
    paths = ["q" * k + "f" * (n - k) for k in range(1, n)]
    out = hybrid.run_paths(x, paths)
    lp = split_blocks(hybrid.twin, default_boundaries(hybrid.partner))
    fp = split_blocks(hybrid.partner, default_boundaries(hybrid.partner))
    for k in range(1, n):
        h = x
        for b in lp[:k]:
            h = b(h)
        for b in fp[k:]:
            h = b(h)
        assert torch.equal(out[paths[k - 1]], h)


def test_lp_prefix_is_computed_once_per_step():
    hybrid = build()
    calls = {}
    for name, m in hybrid.twin.named_children():
        m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    x, y = batch()
    hybrid.training_step(x, y)
    assert calls and all(c == 1 for c in calls.values()), calls


def test_schedule_none_is_plain_qat():
    hybrid = build(schedule="none")
    plain = copy.deepcopy(hybrid.twin)
    x, y = batch()
    loss, _ = hybrid.training_step(x, y)
    loss.backward()
    ref = F.cross_entropy(plain(x), y)
    ref.backward()
    assert torch.equal(loss, ref)
    for (n1, p1), (n2, p2) in zip(hybrid.twin.named_parameters(), plain.named_parameters()):
        assert n1 == n2 and torch.equal(p1.grad, p2.grad), n1


def test_prefix_loss_is_lp_ce_plus_mean_of_mixed_ce():
    hybrid = build()
    x, y = batch()
    loss, logs = hybrid.training_step(x, y)
    n = hybrid.n
    mixed = torch.stack([logs[f"ce/{'q' * k + 'f' * (n - k)}"] for k in range(1, n)]).mean()
    assert loss.item() == pytest.approx((logs["ce/lp"] + mixed).item(), rel=1e-6)


def test_kd_term_uses_the_partner_logits():
    hybrid = build(schedule="none", w_kd=1.0)
    x, y = batch()
    loss, logs = hybrid.training_step(x, y)
    with torch.no_grad():
        z0, zn = hybrid.partner(x), hybrid.twin(x)
    kl = F.kl_div(F.log_softmax(zn / 2, 1), F.softmax(z0 / 2, 1), reduction="batchmean") * 4
    assert logs["kd"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx((F.cross_entropy(zn, y) + kl).item(), rel=1e-5)
