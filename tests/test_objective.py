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

LOSS = {"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0, "w_mp_kd": 0.0}


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


# --- the terms of the objective, against hand computations ---


def paths_out(hybrid, x, mixed):
    n = hybrid.n
    with torch.no_grad():
        out = hybrid.run_paths(x, ["q" * n, "f" * n, *mixed])
    return out["q" * n], out["f" * n], [out[p] for p in mixed]


def test_mixed_paths_teach_the_twin_uniform():
    """w_mp_kd * mean_k KL(z_k||z_n) at T, scaled by T^2; the other terms as before."""
    hybrid = tiny("prefix", w_mp_kd=0.7, T=2.0)
    x, y = batch()
    loss, logs = hybrid.training_step(x, y)
    mixed = [prefix_path(k, hybrid.n) for k in range(1, hybrid.n)]
    zn, _, zk = paths_out(hybrid, x, mixed)
    mp = sum(kl(z, zn, 2.0) for z in zk) / len(zk)
    ce = F.cross_entropy(zn, y) + sum(F.cross_entropy(z, y) for z in zk) / len(zk)
    assert logs["mp_kd"].item() == pytest.approx(mp.item(), rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx((ce + 0.7 * mp).item(), rel=1e-5)


def test_geometric_path_weights_in_every_term():
    """n = 3: the prefix paths qff (k=1) and qqf (k=2) weigh 1/4 : 1/2, i.e. 1/3 and 2/3."""
    hybrid = tiny("prefix", w_mix=0.5, w_kd=0.3, w_mp_kd=0.7, T=3.0, path_weights="geometric")
    x, y = batch()
    loss, logs = hybrid.training_step(x, y)
    zn, z0, (z1, z2) = paths_out(hybrid, x, ["qff", "qqf"])
    a1, a2 = 1 / 3, 2 / 3
    ce_mixed = a1 * F.cross_entropy(z1, y) + a2 * F.cross_entropy(z2, y)
    kd_mixed = a1 * kl(z0, z1, 3.0) + a2 * kl(z0, z2, 3.0)
    mp = a1 * kl(z1, zn, 3.0) + a2 * kl(z2, zn, 3.0)
    expected = F.cross_entropy(zn, y) + 0.5 * ce_mixed + 0.3 * (kl(z0, zn, 3.0) + kd_mixed) + 0.7 * mp
    for key, value in {"ce_mixed": ce_mixed, "kd/lp": kl(z0, zn, 3.0), "kd/mixed": kd_mixed, "mp_kd": mp}.items():
        assert logs[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_path_weights_sum_to_one():
    from bqat.objective import Objective
    from bqat.replace import single_path

    geometric, uniform = Objective(path_weights="geometric"), Objective()
    for n in range(2, 7):
        for paths in ([prefix_path(k, n) for k in range(1, n)], [single_path(k, n) for k in range(1, n + 1)]):
            for objective in (geometric, uniform):
                assert sum(objective.weights(paths, n)) == pytest.approx(1.0)
    assert geometric.weights([prefix_path(k, 4) for k in (1, 2, 3)], 4) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert geometric.weights([single_path(k, 3) for k in (1, 2, 3)], 3) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert geometric.weights(["qqf"], 3) == [1.0]  # one sampled path: weight 1


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_mixed_path_teachers_are_detached_unless_asked(teacher_grad):
    """With only CE(z_n) and w_mp_kd active: the twin's logits always get the term's gradient;
    the mixed paths' logits get one only with mp_teacher_grad=true."""
    hybrid = tiny("prefix", w_mix=0.0, w_mp_kd=1.0, T=2.0, mp_teacher_grad=teacher_grad)
    x, y = batch()
    n = hybrid.n
    mixed = [prefix_path(k, n) for k in range(1, n)]
    out = hybrid.run_paths(x, ["q" * n, *mixed])
    zn = out["q" * n].detach().requires_grad_(True)
    zk = torch.cat([out[p] for p in mixed]).detach().requires_grad_(True)
    loss, _ = hybrid.objective(y, zn, zk, mixed, n)
    loss.backward()
    ce_only = torch.autograd.grad(F.cross_entropy(zn, y), zn)[0]
    assert not torch.allclose(zn.grad, ce_only)  # the twin learns from its mixed paths
    if teacher_grad:
        assert zk.grad is not None and zk.grad.abs().sum() > 0
    else:
        assert zk.grad is None or torch.count_nonzero(zk.grad) == 0


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_twin_gradient_of_a_step_matches_hand_objective(teacher_grad):
    """The whole step, twin parameters included, against the objective written by hand."""
    hybrid = tiny("prefix", w_mix=0.0, w_mp_kd=1.0, T=2.0, mp_teacher_grad=teacher_grad)
    x, y = batch()
    loss, _ = hybrid.training_step(x, y)
    loss.backward()
    got = [p.grad.clone() for p in hybrid.twin.parameters()]
    hybrid.twin.zero_grad(set_to_none=True)
    n = hybrid.n
    mixed = [prefix_path(k, n) for k in range(1, n)]
    out = hybrid.run_paths(x, ["q" * n, *mixed])
    zn = out["q" * n]
    teachers = [out[p] if teacher_grad else out[p].detach() for p in mixed]
    ref = F.cross_entropy(zn, y) + sum(kl(t, zn, 2.0) for t in teachers) / len(mixed)
    ref.backward()
    for g, p in zip(got, hybrid.twin.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_no_partner_gradient_under_any_setting():
    settings = [dict(w_kd=1.0, w_mp_kd=1.0, mp_teacher_grad=True, path_weights="geometric"),
                dict(w_kd=0.5, w_mp_kd=1.0, mp_teacher_grad=False, w_mix_decay="cosine")]
    for schedule in ("prefix", "single"):
        for loss in settings:
            hybrid = tiny(schedule, **loss)
            before = copy.deepcopy(hybrid.partner.state_dict())
            x, y = batch()
            step, _ = hybrid.training_step(x, y)
            step.backward()
            assert all(p.grad is None and not p.requires_grad for p in hybrid.partner.parameters())
            assert all(torch.equal(before[k], v) for k, v in hybrid.partner.state_dict().items())


@pytest.mark.parametrize("key, value, message", [
    ("w_mp_kd", -1.0, "loss.w_mp_kd must be a number >= 0"),
    ("T", 0, "loss.T must be a number > 0"),
    ("path_weights", "harmonic", "loss.path_weights='harmonic'; choose uniform or geometric"),
    ("mp_teacher_grad", "yes", "loss.mp_teacher_grad must be true or false"),
    ("w_mix_decay", "step", "loss.w_mix_decay='step'; choose constant, linear or cosine"),
    ("w_kdd", 1.0, "unknown loss key"),
])
def test_bad_loss_values_are_one_line_errors(compose_cfg, key, value, message):
    from bqat.config import validate
    from bqat.errors import UserError
    from bqat.objective import Objective

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        Objective.from_cfg({**LOSS, key: value})
    if key != "w_kdd":  # a key the config does not have is Hydra's error, at composition
        with pytest.raises(UserError, match=message):
            validate(compose_cfg(f"loss.{key}={value}"))
    # Older configs and checkpoints lack the new keys: the defaults apply.
    assert Objective.from_cfg(LOSS) == Objective()



def test_runner_defaults_and_older_configs(compose_cfg):
    """bqat-train's default objective is the ablation's best (both KD terms on); a loss config
    that predates a key (an older run, a library call) keeps that term off."""
    from bqat.objective import Objective

    runner = Objective.from_cfg(compose_cfg().loss)
    assert (runner.w_mix, runner.w_kd, runner.w_mp_kd, runner.T) == (1.0, 1.0, 1.0, 4.0)
    assert (runner.path_weights, runner.mp_teacher_grad) == ("uniform", False)
    older = Objective.from_cfg({"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0, "w_mp_kd": 0.0})
    assert older.w_mp_kd == 0.0 and older == Objective() == Objective.from_cfg(None)
