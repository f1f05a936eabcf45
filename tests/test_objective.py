"""The objective of one BlockReplacement step (DESIGN.md, "The method, precisely", step 4)
and the BatchNorm rule of its paths, on a tiny CIFAR ResNet (3 blocks, 8x8 inputs)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bqat.models import default_boundaries
from bqat.models.cifar_resnet import CifarResNet
from bqat.quant import make_twin
from bqat.replace import BlockReplacement, prefix_path

LOSS = {"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0}


def tiny(schedule="prefix", **loss):
    """A 3-block twin and its partner; the partner's BatchNorm statistics are not the identity."""
    torch.manual_seed(0)
    fp = CifarResNet(depth=8, width=4)
    with torch.no_grad():
        fp.train()(torch.randn(16, 3, 8, 8))
    fp.eval()
    twin = make_twin(fp, OmegaConf.create({"name": "lsq", "per_channel": False}), OmegaConf.create({"w": 2, "a": 2, "first_last": 8}))
    with torch.no_grad():
        twin(torch.randn(8, 3, 8, 8))  # initialise step sizes
    schedule = OmegaConf.create(schedule if isinstance(schedule, dict) else {"name": schedule})
    return BlockReplacement(twin, fp, default_boundaries(fp), schedule, OmegaConf.create({**LOSS, **loss})).train()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def kl(teacher, student, T):
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, batch mean, written out."""
    p = torch.softmax(teacher / T, 1)
    return (p * (p.log() - torch.log_softmax(student / T, 1))).sum(1).mean() * T * T


def norms(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


# --- BatchNorm: every twin BatchNorm is updated once per step, by the twin's own LP path ---


@pytest.mark.parametrize("schedule", [{"name": "prefix"}, {"name": "single", "k": None},
                                      {"name": "sampled", "pool": "prefix"}, {"name": "sampled", "pool": "single", "k": None}],
                         ids=["prefix", "single", "sampled-prefix", "sampled-single"])
def test_every_twin_batchnorm_is_updated_once_per_step(schedule):
    hybrid = tiny(schedule)
    alone = copy.deepcopy(hybrid.twin)  # the twin on its own, on the same batches
    before = [int(m.num_batches_tracked) for _, m in norms(hybrid.twin)]
    steps = 4
    for s in range(steps):
        x, y = batch(s)
        hybrid.training_step(x, y)  # no optimizer step: the twin's weights stay as `alone`'s
        with torch.no_grad():
            alone(x)
    for (name, m), (_, ref), start in zip(norms(hybrid.twin), norms(alone), before):
        assert int(m.num_batches_tracked) - start == steps, name
        # Statistics of the twin's own features only, none of the partner's.
        assert torch.allclose(m.running_mean, ref.running_mean, atol=1e-6), name
        assert torch.allclose(m.running_var, ref.running_var, atol=1e-6), name
    assert all(m.track_running_stats for _, m in norms(hybrid.twin))  # restored after each off-prefix call


def test_twin_block_on_partner_features_uses_batch_statistics():
    hybrid = tiny("single")
    x, _ = batch()
    z = hybrid.run_paths(x, ["fqf"])["fqf"]
    lp, fp = hybrid.lp_blocks, hybrid.fp_blocks
    with torch.no_grad():
        h = fp[0](x)
        h = lp[1](h)  # train mode: normalised with the batch's own statistics
        ref = fp[2](h)
    assert torch.allclose(z, ref, atol=1e-6)


# --- w_mix_decay: every mixed-path term decays together ---


@pytest.mark.parametrize("progress", [0.5, 1.0])
def test_decay_scales_every_mixed_path_term(progress):
    """Linear decay: at progress p the mixed paths' CE and KD weigh (1-p); the twin's own terms
    CE(z_n) and KL(z_0||z_n) keep their weight, so the run ends on them alone."""
    hybrid = tiny("prefix", w_kd=0.5, T=2.0, w_mix_decay="linear")
    hybrid.progress = progress
    x, y = batch()
    loss, logs = hybrid.training_step(x, y)
    n = hybrid.n
    mixed = [prefix_path(k, n) for k in range(1, n)]
    with torch.no_grad():
        out = hybrid.run_paths(x, ["q" * n, "f" * n, *mixed])
    zn, z0 = out["q" * n], out["f" * n]
    d = 1.0 - progress
    ce_mixed = sum(F.cross_entropy(out[p], y) for p in mixed) / len(mixed)
    kd_mixed = sum(kl(z0, out[p], 2.0) for p in mixed) / len(mixed)
    expected = F.cross_entropy(zn, y) + d * ce_mixed + 0.5 * (kl(z0, zn, 2.0) + d * kd_mixed)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["mix_decay"] == pytest.approx(d)  # at the end (p = 1): 0, the twin's own terms alone
