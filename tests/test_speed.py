"""Speed by default: the device-side finite-loss guard, no device read between log steps,
compile=auto (eager in short runs), the compiled CUDA-graph step's code path on CPU."""

import logging
from types import SimpleNamespace

import pytest
import timm.scheduler
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bqat import accel as accel_mod
from bqat.accel import Accel, auto_compile, compile_blocks, compiler_works
from bqat.data import TensorLoader
from bqat.engine import DivergedError, FitState, fit, train_epoch
from bqat.errors import UserError
from bqat.guard import UpdateGuard
from bqat.models import default_boundaries
from bqat.models.cifar_resnet import CifarResNet
from bqat.quant import QUANTIZERS, keep_scales_positive, make_twin
from bqat.replace import BlockReplacement

TRAINER = OmegaConf.create({"limit_train_batches": None, "limit_val_batches": 1, "log_every_n_steps": 4, "progress": False})


class Poisoned(nn.Module):
    """A task with an LP and a mixed-path term; at call `nan_at` the mixed term is NaN, at
    call `grad_nan_at` the loss is finite but its gradient NaN."""

    def __init__(self, nan_at=None, grad_nan_at=None):
        super().__init__()
        self.lin, self.progress, self.calls = nn.Linear(4, 3), 0.0, 0
        self.nan_at, self.grad_nan_at, self.weights = nan_at, grad_nan_at, {}

    def training_step(self, x, y):
        self.calls += 1
        self.weights[self.calls] = {k: v.clone() for k, v in self.lin.state_dict().items()}  # before this call's update
        out = self.lin(x)
        if self.calls == self.grad_nan_at:
            out.register_hook(lambda g: g * float("nan"))
        ce_lp, ce_mix = F.cross_entropy(out, y), F.cross_entropy(2 * out, y)
        if self.calls == self.nan_at:
            ce_mix = ce_mix * float("nan")
        loss = ce_lp + ce_mix
        return loss, {"ce/lp": ce_lp.detach(), "ce/qqf": ce_mix.detach(), "loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, x):
        return {"lp": self.lin(x)}


def fit_poisoned(task, clip_grad=None, fused=True):
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    data = SimpleNamespace(train=TensorLoader(x, y, 4, shuffle=True, drop_last=True), val=TensorLoader(x, y, 8))  # 8 steps per epoch
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1, momentum=0.9, fused=fused)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, step_on_epochs=False, updates_per_epoch=8)
    assert UpdateGuard(optimizer, torch.device("cpu")).on_device is fused
    with pytest.raises(DivergedError) as err:
        fit(task, data, optimizer, scheduler, epochs=2, cfg=TRAINER, device=torch.device("cpu"), clip_grad=clip_grad)
    return str(err.value)


def test_device_guard_refuses_the_non_finite_update_and_all_later_ones_and_reports_at_the_log_step():
    task = Poisoned(nan_at=2)
    message = fit_poisoned(task)
    assert message.startswith("non-finite loss at step 2 (epoch 1) in ce/qqf; the step was not applied") and "\n" not in message
    assert task.calls == 4  # found at the log step (every 4 updates), not by a read at step 2
    after_step_1 = task.weights[2]
    assert all(torch.equal(after_step_1[k], v) for k, v in task.lin.state_dict().items())  # steps 2, 3, 4: none applied
    assert not torch.equal(task.weights[1]["weight"], after_step_1["weight"])  # step 1 was


def test_device_guard_refuses_non_finite_gradients_of_a_finite_loss():
    task = Poisoned(grad_nan_at=3)
    message = fit_poisoned(task, clip_grad=1.0)
    assert message.startswith("non-finite gradients at step 3 (epoch 1) of a finite loss; the step was not applied")
    assert all(torch.equal(task.weights[3][k], v) for k, v in task.lin.state_dict().items())


def test_host_guard_stops_before_the_update_of_a_non_fused_optimizer():
    task = Poisoned(nan_at=2)
    assert fit_poisoned(task, fused=False).startswith("non-finite loss at step 2 (epoch 1) in ce/qqf;")
    assert task.calls == 2 and all(torch.equal(task.weights[2][k], v) for k, v in task.lin.state_dict().items())


class DeviceReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (`.item()`, `float(t)`, `if t:`): each is a sync on CUDA."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def tiny_hybrid():
    torch.manual_seed(0)
    fp = CifarResNet(depth=8, width=4)
    with torch.no_grad():
        fp.train()(torch.randn(8, 3, 8, 8))
    fp.eval()
    twin = make_twin(fp, OmegaConf.create({"name": "lsq", "per_channel": False, "compile": "auto"}), OmegaConf.create({"w": 2, "a": 2, "first_last": 8}))
    loss_cfg = OmegaConf.create({"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0, "w_mp_kd": 0.0})
    hybrid = BlockReplacement(twin, fp, default_boundaries(fp), OmegaConf.create({"name": "prefix"}), loss_cfg).train()
    with torch.no_grad():
        twin(torch.randn(8, 3, 8, 8))  # quantizer initialisation reads values once, before training
    return hybrid


def reads_in_one_epoch(hybrid, steps: int, fused: bool) -> int:
    g = torch.Generator().manual_seed(1)
    loader = TensorLoader(torch.randn(8 * steps, 3, 8, 8, generator=g), torch.randint(0, 10, (8 * steps,), generator=g), 8, shuffle=True, drop_last=True)
    optimizer = torch.optim.SGD(hybrid.twin.parameters(), lr=0.01, momentum=0.9, fused=fused)
    keep_scales_positive(optimizer, hybrid.twin)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, step_on_epochs=False, updates_per_epoch=steps)
    cfg = OmegaConf.create({"limit_train_batches": None, "log_every_n_steps": 1000, "progress": False})
    counter = DeviceReads()
    with counter:
        train_epoch(hybrid, loader, optimizer, scheduler, FitState(), epochs=1, cfg=cfg, device=torch.device("cpu"), clip_grad=5.0)
    return counter.reads


def test_a_step_reads_nothing_back_from_the_device_between_log_steps():
    """Block replacement with LSQ, clipping, fused SGD and the guard: the reads of a 1-step and
    a 4-step epoch are the same (all at the one log step, the last): a CUDA step never waits."""
    hybrid = tiny_hybrid()
    assert reads_in_one_epoch(hybrid, 1, fused=True) == reads_in_one_epoch(hybrid, 4, fused=True) > 0
    # The host guard (a non-fused optimizer) reads the loss once per step: the count can tell.
    assert reads_in_one_epoch(hybrid, 3, fused=False) - reads_in_one_epoch(hybrid, 1, fused=False) == 2


def test_compiled_reduce_overhead_step_trains_like_eager_and_logs_the_compile_cost(caplog):
    """trainer.compile=true trainer.compile_mode=reduce-overhead on CPU: the same engine path as
    on CUDA (compiled blocks, fused guard, step marks), CUDA graphs aside (aot_eager here)."""
    eager, compiled = tiny_hybrid(), tiny_hybrid()
    compile_blocks(compiled, backend="aot_eager", mode="reduce-overhead")
    runs = {}
    for name, hybrid in (("eager", eager), ("compiled", compiled)):
        accel = Accel(OmegaConf.create({"compile_mode": "reduce-overhead"}), torch.device("cpu"))
        if name == "compiled":
            accel.use_compiled("trainer.compile", "reduce-overhead")
        assert accel.cudagraphs is False  # CUDA only
        g = torch.Generator().manual_seed(1)
        loader = TensorLoader(torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g), 8, shuffle=True, drop_last=True)
        optimizer = torch.optim.SGD(hybrid.twin.parameters(), lr=0.01, momentum=0.9, fused=True)
        scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, step_on_epochs=False, updates_per_epoch=3)
        cfg = OmegaConf.create({"limit_train_batches": None, "log_every_n_steps": 2, "progress": False})
        state = FitState()
        with caplog.at_level(logging.INFO, logger="bqat"):
            train_epoch(hybrid, loader, optimizer, scheduler, state, epochs=1, cfg=cfg, device=torch.device("cpu"), accel=accel, clip_grad=5.0)
        runs[name] = (state, accel, [p.detach().clone() for p in hybrid.twin.parameters()])
    (s_e, a_e, p_e), (s_c, a_c, p_c) = runs["eager"], runs["compiled"]
    assert s_c.step == s_e.step == 3 and s_c.first_step_loss == pytest.approx(s_e.first_step_loss, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(p_e, p_c))
    assert a_e.compile_cost_s is None and a_c.compile_cost_s is not None and a_c.clock is None
    assert any(r.message.startswith("compile (trainer.compile): first step") for r in caplog.records)


# --- compile=auto ---------------------------------------------------------------------------


def test_auto_compile_is_eager_for_short_runs_without_probing(monkeypatch):
    def no_probe(*_):
        raise AssertionError("a short run must not probe the compiler")

    monkeypatch.setattr(accel_mod, "compiler_works", no_probe)
    cpu = torch.device("cpu")
    for what in ("trainer", "quant"):
        chosen, why = auto_compile("auto", what, 220, cpu)
        assert chosen is False and "220 planned updates, fewer than" in why
    assert auto_compile(True, "quant", 1, cpu) == (True, "quant.compile=true")
    assert auto_compile(False, "trainer", 10**9, cpu) == (False, "trainer.compile=false")
    with pytest.raises(UserError, match="trainer.compile must be true, false or auto"):
        auto_compile("yes", "trainer", 1, cpu)
    assert QUANTIZERS["lsq"](2, "act", compile="auto").use_compile is False  # unresolved auto: eager


def test_auto_compile_compiles_long_runs_only_where_a_compiler_works(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(accel_mod, "compiler_works", lambda backend, device: (False, "CppCompileError: no C++ compiler"))
    chosen, why = auto_compile("auto", "quant", 10**6, cpu)
    assert chosen is False and "does not work on cpu: CppCompileError: no C++ compiler" in why
    monkeypatch.setattr(accel_mod, "compiler_works", lambda backend, device: (True, ""))
    assert auto_compile("auto", "quant", accel_mod.AUTO_MIN_STEPS["quant", "cpu"], cpu)[0] is True
    assert compiler_works("no_such_backend", "cpu")[0] is False  # the real probe: a failure is an answer, not an error


def test_the_default_config_stays_eager_on_digits(compose_cfg):
    from bqat.train import choose_compile

    cfg = compose_cfg()
    assert cfg.trainer.compile == "auto" and cfg.quant.compile == "auto" and cfg.optim.optimizer.fused is True
    use_compile, quant_compile, quant_cfg = choose_compile(cfg, "auto", "inductor", 22 * cfg.trainer.epochs, torch.device("cpu"))
    assert (use_compile, quant_compile, quant_cfg.compile, cfg.quant.compile) == (False, False, False, "auto")
