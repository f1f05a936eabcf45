"""Runs that survive kills, in-process: exact resume, atomic writes, full disks, safe loading,
divergence, signals, unreadable checkpoints."""

import ast
import errno
import json
import os
import random
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import timm.optim
import timm.scheduler
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import bqat.models  # noqa: F401  (registers resnet20)
from bqat import preempt
from bqat.data import TensorLoader, random_crop_flip
from bqat.engine import DivergedError, FitState, atomic_save, atomic_write_text, fit, load_checkpoint
from bqat.errors import UserError, WriteError
from bqat.models import default_boundaries
from bqat.quant import make_twin
from bqat.replace import BlockReplacement
from bqat.resume import RunCheckpoint, prepare_run_dir, rng_state, set_rng_state

from conftest import ROOT

TRAINER = OmegaConf.create({"limit_train_batches": 2, "limit_val_batches": 1, "log_every_n_steps": 1, "progress": False})
RUN_CFG = {"resume": True, "seed": 0, "bits": {"w": 2, "a": 2}}


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# --- exact resume of a real twin run (tiny inputs) ------------------------------------


def build_run(tmp_path, seed=0, perturb_partner=False, run_cfg=RUN_CFG):
    """A BlockReplacement run as train.py builds it, on 8x8 random images."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)
    train = TensorLoader(images, labels, 8, shuffle=True, drop_last=True, augment=lambda x, gen: random_crop_flip(x, 1, True, gen), seed=seed)
    data = SimpleNamespace(train=train, val=TensorLoader(images[:16], labels[:16], 8))
    fp = timm.create_model("resnet20", num_classes=10).eval()
    if perturb_partner:
        with torch.no_grad():
            fp.conv1.weight.add_(1.0)
    twin = make_twin(fp, OmegaConf.create({"name": "lsq", "per_channel": False}), OmegaConf.create({"w": 2, "a": 2, "first_last": 8}))
    loss_cfg = OmegaConf.create({"w_mix": 1.0, "w_mix_decay": "linear", "w_kd": 0.5, "T": 2.0, "w_mp_kd": 0.0})
    hybrid = BlockReplacement(twin, fp, default_boundaries(fp), OmegaConf.create({"name": "prefix"}), loss_cfg, seed=seed)
    with torch.no_grad():
        hybrid.twin.train()(next(iter(train))[0])  # quantizer initialisation, as train.py does
    optimizer = timm.optim.create_optimizer_v2(hybrid.twin, opt="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, step_on_epochs=False, updates_per_epoch=2)
    ckpt = RunCheckpoint(tmp_path, OmegaConf.create(run_cfg), hybrid, optimizer, scheduler, train, "partner.pt")
    return SimpleNamespace(hybrid=hybrid, data=data, optimizer=optimizer, scheduler=scheduler, ckpt=ckpt)


def run_fit(run, state=None, on_stop=None):
    return fit(run.hybrid, run.data, run.optimizer, run.scheduler, epochs=2, cfg=TRAINER, device=torch.device("cpu"), state=state,
               on_epoch_end=lambda s, improved: run.ckpt.save(s, best=improved), on_stop=on_stop)


def signal_at_step(run, step, signum):
    """Send `signum` to this process during the `step`-th training step (as SLURM would)."""
    original, calls = run.hybrid.training_step, []

    def training_step(x, y):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return original(x, y)

    run.hybrid.training_step = training_step


def test_resume_mid_epoch_after_sigusr1_repeats_the_uninterrupted_run_exactly(tmp_path):
    reference = build_run(tmp_path / "ref")
    ref_state = run_fit(reference)
    assert ref_state.step == 4

    stopped = build_run(tmp_path / "run")
    signal_at_step(stopped, 3, signal.SIGUSR1)  # epoch 2, during its first batch
    with pytest.raises(SystemExit) as exit_info:
        with preempt.stop_on_signals():
            run_fit(stopped, on_stop=stopped.ckpt.save)
    assert exit_info.value.code == 128 + signal.SIGUSR1
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"], saved["batch"]) == (1, 3, 1)

    resumed = build_run(tmp_path / "run")  # a fresh process: everything rebuilt, then restored
    state = resumed.ckpt.restore()
    assert (state.epoch, state.step, state.batch) == (1, 3, 1) and resumed.ckpt.resumed_from_epoch == 1
    final = run_fit(resumed, state=state)

    assert final.step == 4 and final.last_val == ref_state.last_val
    ref_twin, twin = reference.hybrid.twin.state_dict(), resumed.hybrid.twin.state_dict()
    assert ref_twin.keys() == twin.keys()
    for key in ref_twin:
        same = torch.equal(ref_twin[key], twin[key]) if torch.is_tensor(ref_twin[key]) else ref_twin[key] == twin[key]
        assert same, key
    ref_momentum = [s["momentum_buffer"] for s in reference.optimizer.state_dict()["state"].values()]
    momentum = [s["momentum_buffer"] for s in resumed.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(ref_momentum, momentum, strict=True))


def test_resume_refuses_another_partner_or_config(tmp_path):
    run = build_run(tmp_path)
    run.ckpt.save(FitState(epoch=1, step=2))
    with pytest.raises(UserError, match=r"trained against partner partner\.pt .* different weights .*resume=false"):
        build_run(tmp_path, perturb_partner=True).ckpt.restore()
    with pytest.raises(UserError, match=r"another config \(bits\.w: 2 -> 4\)"):
        build_run(tmp_path, run_cfg={**RUN_CFG, "bits": {"w": 4, "a": 2}}).ckpt.restore()
    assert run.ckpt.restore().step == 2  # the same run resumes


def test_resume_checks_every_recipe_key_but_the_ones_allowed_to_change(tmp_path, caplog):
    """Deny by default: twin.bn_eps or trainer.clip_grad (outside the old MUST_MATCH groups)
    refuse the resume in one line; trainer.epochs, trainer.progress and data.root may change
    (the lr schedule then follows the new epochs); a key only one side has is not compared."""
    recipe = {**RUN_CFG, "twin": {"bn_eps": 1e-3}, "trainer": {"epochs": 2, "clip_grad": 5.0, "progress": True}, "data": {"root": "a"}}
    run = build_run(tmp_path, run_cfg=recipe)
    run.ckpt.save(FitState(epoch=1, step=2))

    def resume(changes, scheduler=run.scheduler):
        cfg = OmegaConf.merge(OmegaConf.create(recipe), OmegaConf.create(changes))
        return RunCheckpoint(tmp_path, cfg, run.hybrid, run.optimizer, scheduler, run.data.train, "partner.pt").restore()

    for changes, shown in [({"twin": {"bn_eps": 1e-5}}, "twin.bn_eps: 0.001 -> 1e-05"), ({"trainer": {"clip_grad": None}}, "trainer.clip_grad: 5.0 -> None")]:
        with pytest.raises(UserError) as err:
            resume(changes)
        assert shown in str(err.value) and "resume=false" in str(err.value) and "\n" not in str(err.value)
    longer, _ = timm.scheduler.create_scheduler_v2(run.optimizer, sched="cosine", num_epochs=4, step_on_epochs=False, updates_per_epoch=2)
    with caplog.at_level("INFO", logger="bqat"):
        assert resume({"trainer": {"epochs": 4, "progress": False}, "data": {"root": "b"}, "loss": {"w_new": 1.0}}, longer).step == 2
    assert longer.t_initial == 8 and "trainer.epochs 2 -> 4" in caplog.text  # not the checkpoint's 4 updates


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    loader_gen, schedule_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    atomic_save({"rng": rng_state(loader_gen.get_state(), schedule_gen)}, tmp_path / "rng.pt")

    def draw():
        return (random.random(), np.random.randn(), torch.rand(3), torch.rand(2, generator=loader_gen), torch.rand(2, generator=schedule_gen))

    first = draw()
    loader = SimpleNamespace(generator=loader_gen)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], loader, schedule_gen)
    again = draw()
    assert first[:2] == again[:2]
    assert all(torch.equal(a, b) for a, b in zip(first[2:], again[2:]))


# --- checkpoint files -----------------------------------------------------------


def test_crash_inside_torch_save_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    atomic_save({"epoch": 1, "w": torch.arange(4.0)}, path)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half a file on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    old = load_checkpoint(path)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_pickle_payload_is_refused_and_runs_no_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(marker)}, path)
    with pytest.raises(UserError, match="not a plain weights file") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: a plain pickle load does run it
    assert marker.exists()


def test_every_torch_load_in_bqat_is_weights_only():
    calls = []
    for file in (ROOT / "bqat").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                weights_only = {k.arg: k.value for k in node.keywords}.get("weights_only")
                calls.append((file.name, isinstance(weights_only, ast.Constant) and weights_only.value is True))
    assert calls and all(ok for _, ok in calls), calls


# --- full disks: one line naming the file, the old file kept --------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_then_no_space(obj, f, *args, **kwargs):
    """torch.save on a disk that fills up half way."""
    f.write(b"the first half of a checkpoint")
    no_space()


def only_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_full_disk_while_saving_checkpoints_keeps_the_old_ones(tmp_path, monkeypatch):
    run = build_run(tmp_path)
    run.ckpt.save(FitState(epoch=1, step=2), best=True)
    checkpoints = tmp_path / "checkpoints"
    before = {name: (checkpoints / name).read_bytes() for name in ("last.pt", "best.pt")}
    monkeypatch.setattr(torch, "save", half_then_no_space)
    with pytest.raises(WriteError) as err:
        run.ckpt.save(FitState(epoch=2, step=4), best=True)
    assert only_line(err).startswith(f"cannot write {checkpoints / 'best.pt'}: No space left on device (ENOSPC); "
                                     "what was there before is kept. Free space")
    assert {name: (checkpoints / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]


def test_a_full_disk_while_writing_metrics_json_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"epoch": 1}\n')
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(WriteError) as err:
        atomic_write_text(path, '{"epoch": 2}\n')
    assert only_line(err).startswith(f"cannot write {path}: No space left on device (ENOSPC)")
    assert path.read_text() == '{"epoch": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_full_disk_while_caching_the_partner_or_the_data_leaves_no_file(tmp_path, monkeypatch, compose_cfg):
    from PIL import Image

    from bqat.data.files import list_images, load_split
    from bqat.partner import cached_partner

    cfg = compose_cfg("partner.epochs=0", f"partner.cache_dir={tmp_path / 'partners'}", "trainer.limit_val_batches=1")
    data = SimpleNamespace(val=TensorLoader(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)), 8))
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (40, 80, 120)).save(tmp_path / "images" / name / "0.png")
    monkeypatch.setattr(torch, "save", half_then_no_space)

    with pytest.raises(WriteError) as err:
        cached_partner(timm.create_model("resnet20", num_classes=10), data, cfg, torch.device("cpu"))
    assert only_line(err).startswith(f"cannot write {tmp_path / 'partners'}/resnet20-") and "partner.cache_dir=<folder>" in str(err.value)
    assert not list((tmp_path / "partners").glob("*.pt")) and not list((tmp_path / "partners").glob(".*.tmp"))

    with pytest.raises(WriteError) as err:
        load_split(list_images(tmp_path / "images", "<class>/<image>"), 8, 1, str(tmp_path / "cache"), "train")
    assert only_line(err).startswith(f"cannot write {tmp_path / 'cache'}/train-images-8px-") and "data.cache_dir=null" in str(err.value)
    assert not any((tmp_path / "cache").iterdir())


def test_a_full_disk_under_tensorboard_is_one_line_without_the_writer_threads_traceback(tmp_path, monkeypatch, capfd):
    from tensorboard.summary.writer.record_writer import RecordWriter

    from bqat.events import RunWriter

    writer = RunWriter(str(tmp_path / "tb"))
    writer.add_scalar("train/loss", 1.0, 1)
    writer.flush()
    (events,) = (tmp_path / "tb").iterdir()
    before = events.read_bytes()
    monkeypatch.setattr(RecordWriter, "write", no_space)  # what the writer thread calls
    deadline = time.monotonic() + 10
    with pytest.raises(WriteError) as err:  # raised again in this thread by a later call
        while time.monotonic() < deadline:
            writer.add_scalar("train/loss", 2.0, 2)
            writer.flush()
            time.sleep(0.05)
    assert only_line(err).startswith(f"cannot write {tmp_path / 'tb'}: No space left on device (ENOSPC)")
    writer.close_quietly()
    assert events.read_bytes() == before
    assert "Traceback" not in capfd.readouterr().err


# --- an unreadable checkpoint: which file, why, the ways on ----------------------------


def test_a_truncated_last_pt_names_the_ways_on_and_resume_best_repeats_the_run_from_best(tmp_path):
    first = build_run(tmp_path / "run")
    first_state = fit(first.hybrid, first.data, first.optimizer, first.scheduler, epochs=2, cfg=TRAINER, device=torch.device("cpu"),
                      on_epoch_end=lambda s, improved: first.ckpt.save(s, best=s.epoch == 1))  # best.pt: epoch 1
    checkpoints = tmp_path / "run" / "checkpoints"
    torn = (checkpoints / "last.pt").read_bytes()[:1000]
    (checkpoints / "last.pt").write_bytes(torn)

    with pytest.raises(UserError) as err:
        first.ckpt.restore()  # resume=true, as the re-run of the same command
    assert only_line(err) == (
        f"cannot resume from {checkpoints / 'last.pt'}: the file is truncated or corrupt (1000 bytes; not a complete torch archive); "
        "resume=false sets this run's files aside (to previous/) and starts over; "
        f"resume=best resumes from {checkpoints / 'best.pt'} (intact, saved at the end of epoch 1) and trains the later epochs again")

    resumed = build_run(tmp_path / "run", run_cfg={**RUN_CFG, "resume": "best"})
    state = resumed.ckpt.restore()
    assert (state.epoch, state.step, state.batch) == (1, 2, 0) and resumed.ckpt.resumed_from_epoch == 1
    (kept,) = (tmp_path / "run" / "previous").iterdir()
    assert (kept / "checkpoints" / "last.pt").read_bytes() == torn  # set aside, never deleted
    final = run_fit(resumed, state=state)
    assert final.step == 4 and final.last_val == first_state.last_val  # epoch 2 trained again, exactly
    ref_twin, twin = first.hybrid.twin.state_dict(), resumed.hybrid.twin.state_dict()
    assert all(torch.equal(ref_twin[k], twin[k]) if torch.is_tensor(twin[k]) else ref_twin[k] == twin[k] for k in twin)


# --- divergence -----------------------------------------------------------------


class Toy(nn.Module):
    """A task with an LP and one mixed-path term; `nan_at` poisons the mixed term at that step."""

    def __init__(self, nan_at):
        super().__init__()
        self.lin, self.progress, self.calls, self.nan_at = nn.Linear(4, 3), 0.0, 0, nan_at

    def training_step(self, x, y):
        self.calls += 1
        out = self.lin(x)
        ce_lp, ce_mix = F.cross_entropy(out, y), F.cross_entropy(2 * out, y)
        if self.calls == self.nan_at:
            ce_mix = ce_mix * float("nan")
        loss = ce_lp + ce_mix
        return loss, {"ce/lp": ce_lp.detach(), "ce/qqf": ce_mix.detach(), "loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, x):
        return {"lp": self.lin(x)}


def test_non_finite_loss_names_step_and_path_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    data = SimpleNamespace(train=TensorLoader(x, y, 4, shuffle=True), val=TensorLoader(x, y, 8))
    task = Toy(nan_at=6)  # 2 steps per epoch: step 6 is in epoch 3
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=4, step_on_epochs=False, updates_per_epoch=2)
    last = tmp_path / "last.pt"
    after_step_5 = {}

    def on_epoch_end(state, improved):
        atomic_save({"epoch": state.epoch, "lin": task.lin.state_dict()}, last)

    original = task.training_step

    def training_step(x, y):
        if task.calls == 5:
            after_step_5.update({k: v.clone() for k, v in task.lin.state_dict().items()})
        return original(x, y)

    task.training_step = training_step
    with pytest.raises(DivergedError) as err:
        fit(task, data, optimizer, scheduler, epochs=4, cfg=TRAINER, device=torch.device("cpu"), on_epoch_end=on_epoch_end)
    message = str(err.value)
    assert "non-finite loss at step 6 (epoch 3) in ce/qqf;" in message and "ce/lp" not in message and "\n" not in message
    assert load_checkpoint(last)["epoch"] == 2
    assert all(torch.equal(after_step_5[k], v) for k, v in task.lin.state_dict().items())  # the bad step was not applied


# --- signals ----------------------------------------------------------------------


def test_submitit_requeue_handler_runs_after_the_save_and_handlers_are_restored():
    calls = []

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        calls.append(signum)

    before_term = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit) as exit_info:
            with preempt.stop_on_signals(), preempt.deferred():  # inside a training loop
                os.kill(os.getpid(), signal.SIGUSR2)
                assert preempt.requested() == signal.SIGUSR2 and calls == []  # deferred to the step boundary
                raise preempt.Preempted(signal.SIGUSR2, "twin stopped by SIGUSR2 after step 3; saved last.pt")
        assert calls == [signal.SIGUSR2] and exit_info.value.code == 128 + signal.SIGUSR2
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler and signal.getsignal(signal.SIGTERM) == before_term
        assert preempt.requested() is None
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_second_ctrl_c_stops_at_once_mid_save_and_the_last_checkpoint_stays_whole(tmp_path, monkeypatch, capsys):
    run = build_run(tmp_path)
    signal_at_step(run, 3, signal.SIGINT)  # first Ctrl-C in epoch 2: finish the step, then save
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj.get("step") == 3:  # the save the first Ctrl-C asked for
            f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C lands mid-write
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as exit_info:
        with preempt.stop_on_signals():
            run_fit(run, on_stop=run.ckpt.save)
    assert exit_info.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err.splitlines() == [
        "bqat-train: stopped at once by a second SIGINT; the checkpoint saved last is kept as it was; re-run the same command to resume from it"]
    checkpoints = tmp_path / "checkpoints"
    assert (load_checkpoint(checkpoints / "last.pt")["step"]) == 2  # epoch 1's, whole
    assert sorted(p.name for p in checkpoints.iterdir()) in (["best.pt", "last.pt"], ["last.pt"])  # no torn temporary


def test_ctrl_c_outside_a_training_step_stops_at_once_and_in_the_partner_training_says_nothing_was_saved(capsys):
    with pytest.raises(SystemExit) as exit_info:
        with preempt.stop_on_signals():  # building data, waiting for the partner, ...: nothing to finish
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            pytest.fail("SIGINT outside a training loop did not stop at once")
    assert exit_info.value.code == 130
    assert "bqat-train: stopped by SIGINT outside a training step" in capsys.readouterr().err

    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    data = SimpleNamespace(train=TensorLoader(x, y, 4, shuffle=True), val=TensorLoader(x, y, 8))
    task = Toy(nan_at=None)
    signal_at_step(SimpleNamespace(hybrid=task), 2, signal.SIGINT)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, step_on_epochs=False, updates_per_epoch=2)
    with pytest.raises(SystemExit) as exit_info:
        with preempt.stop_on_signals():  # the partner's fit: no on_stop, nothing to save
            fit(task, data, optimizer, scheduler, epochs=2, cfg=TRAINER, device=torch.device("cpu"), desc="partner")
    assert exit_info.value.code == 130 and task.calls == 2
    assert capsys.readouterr().err.splitlines() == ["bqat-train: partner stopped by SIGINT after step 2 (epoch 1); "
                                                    "nothing saved at this stage; re-run the same command to start it again"]


# --- run folder -------------------------------------------------------------------


def test_resume_false_sets_the_old_run_aside_and_a_finished_run_is_skipped(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"old weights")
    (run_dir / "metrics.json").write_text(json.dumps({"epoch": 3, "top1": 50.0}))
    cfg = OmegaConf.create({"resume": True, "trainer": {"epochs": 3}})

    assert prepare_run_dir(run_dir, cfg) == {"epoch": 3, "top1": 50.0}  # finished: skip
    cfg.trainer.epochs = 5
    assert prepare_run_dir(run_dir, cfg) is None  # asks for more epochs: train on
    cfg.resume = False
    assert prepare_run_dir(run_dir, cfg) is None
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()
    (kept,) = (run_dir / "previous").iterdir()
    assert (kept / "checkpoints" / "last.pt").read_bytes() == b"old weights"
    assert json.loads((kept / "metrics.json").read_text())["top1"] == 50.0
