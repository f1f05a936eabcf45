"""The Hydra entry point: `bqat-train` / `python -m bqat.train`.

`train(cfg)` is a flat sequence of builds (DESIGN.md, data flow):
data -> FP model -> partner -> twin -> BlockReplacement -> fit -> metrics.json.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import random
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import timm.optim
import timm.scheduler
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bqat import config as _config  # noqa: F401  (registers the run-name resolver)
from bqat import dist
from bqat.accel import Accel, auto_compile, compile_blocks, compile_settings
from bqat.config import conf_dir, quote_numeric_groups, unquote_layer_globs, validate
from bqat.data import build_data
from bqat.engine import FitState, atomic_write_text, fit, resolve_device
from bqat.errors import UserError, WriteError, fail, one_line_hydra_errors
from bqat.events import RunWriter
from bqat.launch import show_sweep_config
from bqat.models import build_model, check_split, model_boundaries
from bqat.partner import get_partner
from bqat.preempt import stop_on_signals
from bqat.quant import Quantizer, add_residual_quantizers, integer_bias, keep_scales_positive, make_twin, residual_bits_of, set_bn_eps
from bqat.quant.size import layer_macs, model_size
from bqat.quant.twin import layer_widths, weights_per_channel
from bqat.replace import BlockReplacement
from bqat.report_console import print_summary
from bqat.resume import RunCheckpoint, prepare_run_dir
from bqat.runlock import hold_run_folder

log = logging.getLogger("bqat")

# conf/ sits at the top level of the repository (DESIGN.md) and ships inside the wheel
# (bqat.config.conf_dir); an absolute path works for the console script and `python -m` alike.
CONF_DIR = str(conf_dir())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_scheduler(optimizer, cfg, updates_per_epoch: int):
    sched = OmegaConf.to_container(cfg.optim.scheduler, resolve=True)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, num_epochs=max(cfg.trainer.epochs, 1), step_on_epochs=False, updates_per_epoch=updates_per_epoch, **sched
    )
    return scheduler


def choose_compile(cfg: DictConfig, setting, backend: str, planned_steps: int, device) -> tuple[bool, bool, DictConfig]:
    """(trainer.compile, quant.compile, the quant config with its choice) for this run, auto resolved
    from the planned updates (bqat.accel.auto_compile); one log line says what was chosen and why."""
    use_compile, why = auto_compile(setting, "trainer", planned_steps, device, backend)
    quant_setting = cfg.quant.get("compile", False)
    if use_compile and quant_setting == "auto":
        quant_compile, quant_why = False, "auto: the compiled blocks already compile the quantizers"
    else:
        quant_compile, quant_why = auto_compile(quant_setting, "quant", planned_steps, device)
    quant_cfg = cfg.quant.copy()
    if "compile" in quant_cfg:
        quant_cfg.compile = quant_compile
    log.info(f"compile: trainer.compile {'on' if use_compile else 'off'} ({why}); "
             f"quant.compile {'on' if quant_compile else 'off'} ({quant_why})")
    return use_compile, quant_compile, quant_cfg


def train(cfg: DictConfig) -> dict:
    with contextlib.ExitStack() as held:  # the run folder's lock, released however the run ends
        return run_training(cfg, held)


def run_training(cfg: DictConfig, held: contextlib.ExitStack) -> dict:
    validate(cfg)
    start = time.perf_counter()
    dist.check_launch(HydraConfig.get().mode == RunMode.MULTIRUN)
    device = dist.setup(resolve_device(cfg.trainer.device))  # joins torchrun's process group, if any
    distributed, is_main = dist.is_distributed(), dist.is_main()
    run_dir = dist.agree_run_dir(Path(HydraConfig.get().runtime.output_dir))
    held.enter_context(hold_run_folder(run_dir))  # before anything in the folder is touched (bqat.runlock)
    with dist.rank_zero_first():  # rank 0 sets an earlier run aside before the others look
        finished = prepare_run_dir(run_dir, cfg)
    if finished is not None:
        return finished  # a re-run sweep skips the runs that are done
    accel = Accel(cfg.trainer, device)
    compile_setting, compile_backend, compile_mode = compile_settings(cfg.trainer)
    seed_everything(cfg.seed)

    # Every rank holds the whole dataset (in-memory sets on the device); the twin's loaders
    # are sharded after the partner, which rank 0 trains on all of it.
    data = build_data(cfg.data, seed=cfg.seed, device=device)
    fp = build_model(cfg.model, data.num_classes, in_chans=data.input_size[0])
    boundaries = model_boundaries(fp, cfg.model, data.input_size)
    check_split(fp, boundaries, data.input_size)
    layer_widths(fp, cfg.bits, cfg.model.name)  # a bits.layers glob that matches no layer fails before the partner trains
    with dist.rank_zero_first():  # trained once, on all the data, by rank 0; read from the cache by the others
        partner, partner_top1, partner_source = get_partner(fp, data, cfg, device)
    data.shard(dist.rank(), dist.world_size())

    # Twin training must not depend on whether the partner was trained or loaded.
    seed_everything(cfg.seed)
    data.train.reseed(cfg.seed)
    updates = len(data.train) if cfg.trainer.limit_train_batches is None else min(len(data.train), cfg.trainer.limit_train_batches)
    use_compile, quant_compile, quant_cfg = choose_compile(cfg, compile_setting, compile_backend, updates * cfg.trainer.epochs, device)
    twin = make_twin(partner, quant_cfg, cfg.bits)
    set_bn_eps(twin, cfg.twin.bn_eps)
    if distributed and cfg.trainer.get("sync_bn", True):
        twin = dist.convert_sync_batchnorm(twin, device)
    # After the SyncBatchNorm swap: the hooks go onto the modules that stay.
    integer_bias_epochs = integer_bias.frozen_epochs(cfg.twin)
    integer_bias.attach_integer_bias(twin, cfg.twin.get("integer_bias", False))
    add_residual_quantizers(twin, quant_cfg, cfg.twin.get("residual_bits"))  # quant.compile as resolved
    hybrid = accel.prepare(BlockReplacement(twin, partner, boundaries, cfg.schedule, cfg.loss, seed=cfg.seed,
                                            example_input=data.input_size))
    optimizer = hydra.utils.instantiate(cfg.optim.optimizer)(hybrid.twin)
    keep_scales_positive(optimizer, hybrid.twin)  # step sizes stay >= their floor (bqat.quant.base)
    scheduler = build_scheduler(optimizer, cfg, updates)

    # Quantizer step sizes are initialised from a batch before the optimizer sees them.
    # Under DDP the ranks average what they initialised (Quantizer.initialize).
    init_x, _ = accel.to_device(*next(iter(data.train)))
    with torch.no_grad():
        hybrid.twin.train()(init_x)

    # Last before fit: resuming restores the random states too.
    ckpt = RunCheckpoint(run_dir, cfg, hybrid, optimizer, scheduler, data.train, partner_source)
    state = ckpt.restore()
    resumed_from = ckpt.resumed_from_epoch

    if use_compile:  # after initialisation and resume: the graphs see initialised quantizers
        compile_blocks(hybrid, backend=compile_backend, mode=compile_mode)
        accel.use_compiled("trainer.compile", compile_mode)
    elif quant_compile:
        accel.use_compiled("quant.compile")
    task = dist.DistributedTask(hybrid, device) if distributed else hybrid

    # Rank 0 alone writes. Resuming drops the events logged after the checkpoint (they are trained again).
    writer = RunWriter(str(run_dir / "tb"), purge_step=None if resumed_from is None else state.step + 1) if is_main else None
    if writer is not None:
        held.callback(writer.close_quietly)  # stopped early: the events up to the stop reach the disk
        writer.add_scalar("partner/top1", partner_top1, 0)

    def on_epoch_end(state: FitState, improved: bool) -> None:
        if not is_main:
            return
        writer.flush()  # a failed event write (from its thread) ends the run here at the latest
        ckpt.save(state, best=improved)
        for name, module in hybrid.twin.named_modules():  # learned grids: LSQ's s, PACT's alpha / L, ...
            if isinstance(module, Quantizer) and next(module.parameters(recurse=False), None) is not None:
                writer.add_scalar(f"step_size/{name}", module.scale_zero_point()[0].float().mean(), state.step)

    def on_stop(state: FitState) -> Path | None:
        return ckpt.save(state) if is_main else None

    def on_epoch_start(epoch: int) -> None:  # twin.integer_bias_epochs: the last epochs train the folded form
        frozen = bool(integer_bias_epochs) and epoch >= cfg.trainer.epochs - integer_bias_epochs
        if frozen and not any(h.frozen for h in integer_bias.hooks(hybrid.twin)):  # the first such epoch, or a resumed one
            log.info(f"twin epoch {epoch + 1}: BatchNorm statistics frozen, biases on the integer grid (twin.integer_bias_epochs)")
        integer_bias.freeze(hybrid.twin, frozen)

    state = fit(task, data, optimizer, scheduler, epochs=cfg.trainer.epochs, cfg=cfg.trainer, device=device,
                state=state, writer=writer, metric="lp", desc="twin", on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end, on_stop=on_stop,
                accel=accel, distributed=distributed, clip_grad=cfg.trainer.get("clip_grad"))
    if writer is not None:
        writer.close()

    metrics = {
        "top1": state.last_val.get("lp"),
        "best_top1": state.best_top1 if state.epoch else None,
        "epoch": state.epoch,
        "model": cfg.model.name,
        "quant": cfg.quant.name,
        "schedule": cfg.schedule.name,
        "bits_w": int(cfg.bits.w),
        "bits_a": int(cfg.bits.a),
        "per_channel": weights_per_channel(cfg.quant.get("per_channel", False), partner),
        "first_last": str(cfg.bits.first_last),
        "resumed_from_epoch": resumed_from,
        "world_size": dist.world_size(),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "train_seconds": round(state.train_seconds, 2),
        "partner_top1": partner_top1,
        "partner_source": partner_source,
        "mixed_top1": [state.last_val[f"mixed_{k}"] for k in range(1, len(boundaries)) if f"mixed_{k}" in state.last_val],
        "seed": cfg.seed,
        "data": cfg.data.name,
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        # The twin's optimiser settings that tuning grids vary (scripts/report.py keys rows by lr).
        "lr": float(cfg.optim.optimizer.lr),
        "weight_decay": float(cfg.optim.optimizer.get("weight_decay", 0.0)),
        "first_step_loss": state.first_step_loss,
        "precision": str(cfg.trainer.get("precision", "fp32")),
        "compile": use_compile,  # trainer.compile as chosen (auto resolved)
        "quant_compile": quant_compile,  # quant.compile as chosen: the quantizer cores compiled on their own
        "compile_cost_s": None if accel.compile_cost_s is None else round(accel.compile_cost_s, 1),
        # Stability recipe of low-bit depthwise twins (README, "Models and blocks").
        "depthwise": str(cfg.bits.get("depthwise", "same")),
        "twin_bn_eps": cfg.twin.bn_eps,
        "twin_residual_bits": residual_bits_of(hybrid.twin),  # twin.residual_bits as built (auto resolved)
        "twin_integer_bias": bool(integer_bias.hooks(hybrid.twin)),  # twin.integer_bias as built
        "twin_integer_bias_epochs": integer_bias_epochs,
        "clip_grad": cfg.trainer.get("clip_grad"),
        # Per-layer precision and what it costs (bqat.quant.size says what counts).
        "bits_layers": OmegaConf.to_container(cfg.bits.layers, resolve=True) if cfg.bits.get("layers") else None,
        **model_size(hybrid.twin, layer_macs(partner, data.input_size)),
    }
    if is_main:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        print_summary(metrics, run_dir)
    dist.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
    return metrics


# A full or failing disk, wherever it shows: one line, never a traceback.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    try:
        with stop_on_signals():  # SIGINT/SIGTERM/SIGUSR1: finish the step, save, exit
            train(cfg)
    except UserError as err:
        log.error(str(err))
        fail(str(err))
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise
        error = WriteError(err.filename or "a file", err)  # one not written through bqat's writers
        log.error(str(error))
        fail(str(error))
    finally:
        dist.teardown()


def main() -> None:
    """Console script `bqat-train` and `python -m bqat.train`."""
    sys.argv[1:] = dist.rank_overrides(quote_numeric_groups(unquote_layer_globs(sys.argv[1:])))
    # A full disk fails train.log's writes too: no "--- Logging error ---" traceback per line,
    # the one error line says it (bqat.errors.WriteError).
    logging.raiseExceptions = False
    try:
        with one_line_hydra_errors():
            if show_sweep_config(sys.argv[1:], CONF_DIR):  # `-m ... --cfg hydra`, which Hydra 1.3 refuses
                return
            hydra_main()
    except KeyboardInterrupt:  # Ctrl-C before a run started (while Hydra composes): nothing to save
        print("bqat-train: interrupted outside a run (nothing in progress was lost)", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
