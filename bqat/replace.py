"""BlockReplacement: the LP twin trained with mixed-precision paths through a frozen FP partner.

A *path* is a string over {'q', 'f'}, one letter per block: 'q' runs the twin's block
Q_k, 'f' the partner's F_k. The LP backbone is 'qqqq'; the paper's mixed path k is
'q'*k + 'f'*(n-k); schedule `single` uses 'f'*(k-1) + 'q' + 'f'*(n-k). Paths are
evaluated block by block through a prefix memo, so a shared prefix (h_k of the LP
backbone) is computed once per step and every path reuses it (DESIGN.md, step 2).

With `schedule.batch_paths` (default), the prefixes that enter the same partner block F_j
go through it as one concatenated batch, forward and backward: a `prefix` step calls each
partner block once, n-1 calls instead of n(n-1)/2. The partner is in eval mode (running
BatchNorm statistics), so each row of the batch is computed as it would be alone: the
result equals the unbatched paths to float rounding. Twin blocks are never batched: in
train mode their BatchNorm normalises with the statistics of whatever batch it is given.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bqat.blocks import block_cut, check_blocks, check_names, probe, shared_parameter
from bqat.config import loss_config, named_config
from bqat.errors import BadArgument, UserError
from bqat.objective import Objective, kd_loss, mix_weight  # noqa: F401  (kd_loss, mix_weight: public here too)
from bqat.quant import quantizer_regularization
from bqat.registry import Registry

SCHEDULES = Registry("schedule")
register_schedule = SCHEDULES.register


class Schedule:
    """Which mixed paths a training step uses. `paths(n, generator)` returns path strings."""

    def __init__(self, cfg=None):
        self.cfg = cfg

    def paths(self, n: int, generator: torch.Generator) -> list[str]:
        raise NotImplementedError


@register_schedule("prefix")
class PrefixSchedule(Schedule):
    """All n-1 mixed paths Q_1..Q_k -> F_{k+1}..F_n every step (the paper)."""

    def paths(self, n, generator):
        return [prefix_path(k, n) for k in range(1, n)]


@register_schedule("none")
class NoSchedule(Schedule):
    """No mixed path: plain QAT."""

    def paths(self, n, generator):
        return []


@register_schedule("single")
class SingleSchedule(Schedule):
    """One LP block alone inside the FP network: F_n..F_{k+1} Q_k F_{k-1}..F_1.

    `k: null` uses every k = 1..n each step; an int (1-based) only that block. The pure FP
    prefixes F_{k-1}..F_1 carry no gradient and are shared between paths (prefix memo).
    """

    def paths(self, n, generator):
        k = None if self.cfg is None else self.cfg.get("k")
        if k is None:
            return [single_path(k, n) for k in range(1, n + 1)]
        if not 1 <= int(k) <= n:
            raise UserError(f"schedule.k={k} but the model has {n} blocks; use 1..{n} or null (all)")
        return [single_path(int(k), n)]


@register_schedule("sampled")
class SampledSchedule(Schedule):
    """One mixed path per step, drawn uniformly from another schedule's paths (`pool`, default prefix)."""

    def __init__(self, cfg=None):
        super().__init__(cfg)
        pool = "prefix" if cfg is None else cfg.get("pool", "prefix")
        if pool not in SCHEDULES or pool == "sampled":
            raise UserError(f"schedule.pool={pool!r}; choose one of: {', '.join(sorted(set(SCHEDULES) - {'sampled'}))}")
        self.pool = SCHEDULES[pool](cfg)

    def paths(self, n, generator):
        pool = self.pool.paths(n, generator)
        if not pool:
            return []
        # Drawn with the BlockReplacement's own generator: every DDP rank draws the same path.
        return [pool[int(torch.randint(len(pool), (1,), generator=generator))]]


def prefix_path(k: int, n: int) -> str:
    """The paper's mixed path k: Q_1..Q_k then F_{k+1}..F_n."""
    return "q" * k + "f" * (n - k)


def single_path(k: int, n: int) -> str:
    """Block k of the twin alone inside the partner: F_1..F_{k-1}, Q_k, F_{k+1}..F_n."""
    return "f" * (k - 1) + "q" + "f" * (n - k)


def build_schedule(cfg) -> Schedule:
    return SCHEDULES[cfg.name](cfg)


def batch_paths_setting(cfg) -> bool:
    """`schedule.batch_paths` (default true: exact, the partner being in eval mode)."""
    value = True if cfg is None else cfg.get("batch_paths", True)
    if not isinstance(value, bool):
        raise UserError(f"schedule.batch_paths must be true or false, got {value!r}")
    return value


class PrefixMemo:
    """Prefix -> its tensor. One partner call on several prefixes stores one tensor, each
    prefix owning a block of `batch` rows in it; `gather` hands such a block run back whole
    (no copy) when the next call takes the same prefixes in the same order."""

    def __init__(self, x: torch.Tensor):
        self.batch = x.shape[0]
        self.tensors: list[tuple[torch.Tensor, int]] = [(x, 1)]  # (tensor, prefixes in it)
        self.where: dict[str, tuple[int, int]] = {"": (0, 0)}  # prefix -> (tensor index, row block)

    def put(self, prefixes: list[str], tensor: torch.Tensor) -> None:
        index = len(self.tensors)
        self.tensors.append((tensor, len(prefixes)))
        for row, p in enumerate(prefixes):
            self.where[p] = (index, row)

    def get(self, prefix: str) -> torch.Tensor:
        index, row = self.where[prefix]
        tensor, size = self.tensors[index]
        return tensor if size == 1 else tensor.narrow(0, row * self.batch, self.batch)

    def order(self, prefixes: list[str]) -> list[str]:
        """`prefixes` in storage order, so that rows stored together are gathered as one piece."""
        return sorted(prefixes, key=self.where.__getitem__)

    def gather(self, prefixes: list[str]) -> torch.Tensor:
        """The rows of `prefixes`, concatenated in the given order."""
        pieces: list[list[int]] = []  # [tensor index, first row block, end row block]
        for p in prefixes:
            index, row = self.where[p]
            if pieces and pieces[-1][0] == index and pieces[-1][2] == row:
                pieces[-1][2] += 1
            else:
                pieces.append([index, row, row + 1])
        parts = []
        for index, start, end in pieces:
            tensor, size = self.tensors[index]
            whole = start == 0 and end == size
            parts.append(tensor if whole else tensor.narrow(0, start * self.batch, (end - start) * self.batch))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module):
    """Inside: `model`'s BatchNorms normalise with batch statistics (in train mode) and leave
    running_mean, running_var and num_batches_tracked as they are.

    The rule of a step: a twin block updates its running statistics only on its own LP
    prefix, so every twin BatchNorm is updated exactly once per step under every schedule
    and its statistics describe the twin's own features, never the partner's.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False  # train mode + untracked: torch passes no running buffers
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class BlockReplacement(nn.Module):
    """Trains `twin` (low precision) with mixed paths through `partner` (full precision, frozen).

    twin: any nn.Module whose forward is the low-precision network (bqat's `make_twin`, a
      Brevitas model, the user's own quantized modules); `br.twin` is what you deploy.
    partner: the FP network of the same architecture. It is frozen here: eval mode (BatchNorm
      uses its running statistics) and requires_grad=False, while gradients flow through it
      to its inputs. It must not share parameters with the twin.
    blocks: None (bqat's automatic split, timm models), a list of lists of module names, or a
      callable model -> list of callables applied to both models (bqat.blocks).
    schedule: a name ('prefix', 'sampled', 'single', 'none'), a dict with a 'name' and its
      options, or the `schedule` config; options missing come from conf/schedule/<name>.yaml.
    loss: None, a dict or a DictConfig of some of conf/train.yaml's `loss` keys (the rest are
      its defaults). seed: the generator of sampled schedules.
    example_input: a batch (or its (C, H, W)) to check the blocks with at construction;
      without it the partner's timm `pretrained_cfg` size, else the first batch, is used.

    The check (bqat.blocks.check_blocks): chaining the blocks reproduces each model's forward,
    and twin and partner agree in block count and output shapes; a mismatch is one ValueError
    naming the block or module. It runs the twin only as a copy, so the twin is left as given.

    `loss, logs = br.training_step(x, y)`; `br.evaluate(x)` -> logits of the twin ('lp') and
    of each mixed path ('mixed_k'); `br.parameters()` -> the twin's trainable parameters only.
    """

    def __init__(self, twin: nn.Module, partner: nn.Module, blocks=None, schedule="prefix", loss=None, seed: int = 0,
                 example_input=None):
        super().__init__()
        shared = shared_parameter(twin, partner)
        if shared is not None:
            raise BadArgument(f"the twin shares parameter {shared!r} with the partner; the twin must be a copy (bqat.make_twin copies)")
        self.twin = twin
        self.partner = partner.eval()
        # Frozen: no updates and no weight gradients, but gradients flow through to inputs.
        for p in self.partner.parameters():
            p.requires_grad_(False)
        x, guessed = probe(partner, example_input)
        self.cut, self.block_names = block_cut(blocks, partner, None if x is None else tuple(x.shape[1:]))
        if self.block_names is not None:
            check_names(self.block_names, twin, "twin")
            check_names(self.block_names, partner, "partner")
        self.lp_blocks, self.fp_blocks = self.cut(twin), self.cut(partner)
        if len(self.lp_blocks) != len(self.fp_blocks):
            raise BadArgument(f"the blocks callable gives the twin {len(self.lp_blocks)} blocks and the partner "
                              f"{len(self.fp_blocks)}; it must cut both models alike")
        # Checked now if a probe size is known, else on the first batch (check_once).
        self.checked = x is not None and check_blocks(self.cut, twin, partner, x, guessed=guessed)
        self.n = len(self.lp_blocks)
        self.schedule_cfg = named_config("schedule", schedule, "schedule")
        self.schedule = build_schedule(self.schedule_cfg)
        self.loss_cfg = loss_config(loss)  # one form (a DictConfig over conf/train.yaml's loss) for every caller
        self.objective = Objective.from_cfg(self.loss_cfg)  # validated loss.* (bqat.objective)
        self.progress = 0.0  # fraction of training done, set by the engine (w_mix decay)
        self.generator = torch.Generator().manual_seed(seed)
        # What run_paths calls for 'q' and 'f': the blocks, or compiled versions (bqat.accel).
        self.runners: dict[str, list] = {"q": list(self.lp_blocks), "f": list(self.fp_blocks)}
        self.batch_paths = batch_paths_setting(self.schedule.cfg)
        # The partner-only path (z_0, and single's F_1..F_k inputs) joins the batches of the
        # trainable paths: one call fewer per block, but the backward then also runs over its
        # rows. None: on CUDA (launch-bound) only; on a CPU that backward costs more than a call.
        self.batch_fp_path: bool | None = None
        self.partner_block_calls = 0  # partner-block calls of the last step or run_paths (make bench reports it)

    def check_once(self, x: torch.Tensor) -> None:
        """The construction check, on the first batch, when no probe size was known then."""
        if not self.checked:
            self.checked = check_blocks(self.cut, self.twin, self.partner, x[:2].detach()) or True

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The twin's trainable parameters only ('twin.<name>'): an optimizer built from the
        wrapper can never update the partner. (Moving, state_dict and DDP still see both models.)"""
        if not recurse:  # the wrapper itself owns no parameter
            return
        for name, p in self.twin.named_parameters(prefix=f"{prefix}.twin" if prefix else "twin", remove_duplicate=remove_duplicate):
            if p.requires_grad:
                yield name, p

    def parameters(self, recurse: bool = True):
        """The twin's trainable parameters only: `torch.optim.SGD(br.parameters(), ...)` trains the twin."""
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def train(self, mode: bool = True):
        super().train(mode)
        self.partner.eval()  # BatchNorm of the partner always uses its running statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference is the twin alone: zero overhead."""
        return self.twin(x)

    def run_paths(self, x: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
        """Outputs of each path, computing each distinct prefix once."""
        memo = self._run(x, paths)
        return {p: memo.get(p) for p in paths}

    def _run(self, x: torch.Tensor, paths: list[str]) -> "PrefixMemo":
        """Every prefix of `paths`, block by block: level i runs Q_i and F_i on the prefixes of
        length i-1 that continue with them (F_i on all of them at once with batch_paths)."""
        memo = PrefixMemo(x)
        prefixes = {p[:i] for p in paths for i in range(1, len(p) + 1)}
        calls = 0
        for i in range(1, max(map(len, paths), default=0) + 1):
            level = sorted(p for p in prefixes if len(p) == i)
            # The LP prefix first: a quantizer that initialises on its first input sees the twin's own.
            for p in sorted((p for p in level if p[-1] == "q"), key=lambda p: "f" in p):
                memo.put([p], self._twin_block(i, p, memo.get(p[:-1])))
            for group in self._partner_groups([p for p in level if p[-1] == "f"], x):
                parents = memo.order([p[:-1] for p in group])
                trainable = any("q" in p for p in parents)
                # A pure-FP group has nothing trainable upstream: keep no graph.
                with contextlib.nullcontext() if trainable else torch.no_grad():
                    out = self.runners["f"][i - 1](memo.gather(parents))
                memo.put([p + "f" for p in parents], out)
                calls += 1
        self.partner_block_calls = calls
        return memo

    def _twin_block(self, i: int, prefix: str, h: torch.Tensor) -> torch.Tensor:
        block = self.runners["q"][i - 1]
        if "f" in prefix:
            # Q_i on partner features (`single` paths): batch statistics, running statistics
            # untouched; the LP path updates them, once per step.
            with running_stats_frozen(self.twin):
                return block(h)
        return block(h)

    def joins_fp_path(self, x: torch.Tensor) -> bool:
        """Whether batched suffixes also carry the partner's own path (z_0): `batch_fp_path`, or by
        default on CUDA only (where a call saved is a launch saved)."""
        return x.is_cuda if self.batch_fp_path is None else self.batch_fp_path

    def _partner_groups(self, prefixes: list[str], x: torch.Tensor) -> list[list[str]]:
        """The prefixes entering one partner block, grouped into calls."""
        if not self.batch_paths:
            return [[p] for p in prefixes]
        trainable = [p for p in prefixes if "q" in p]
        fp_only = [p for p in prefixes if "q" not in p]
        if self.joins_fp_path(x) and trainable:
            return [trainable + fp_only]
        return [g for g in (trainable, fp_only) if g]

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_once(x)
        n, objective = self.n, self.objective
        lp_path, fp_path = "q" * n, "f" * n
        mixed = self.schedule.paths(n, self.generator)
        wanted = [lp_path] + mixed + ([fp_path] if objective.w_kd > 0 else [])
        memo = self._run(x, wanted)
        z_lp = memo.get(lp_path)
        mixed = memo.order(mixed)  # storage order: with batch_paths the rows already lie together
        z_mixed = memo.gather(mixed) if mixed else None  # [P * B, C], path after path, no copy when batched
        z_fp = memo.get(fp_path) if objective.w_kd > 0 else None
        loss, logs = objective(y, z_lp, z_mixed, mixed, n, z_fp, self.progress)
        reg = quantizer_regularization(self.twin)  # e.g. PACT's L2 on its clip alpha
        if reg is not None:
            loss = loss + reg
            logs["reg/quant"] = reg.detach()
        logs["loss"] = loss.detach()
        logs["acc/lp"] = (z_lp.argmax(1) == y).float().mean().detach()
        return loss, logs

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of the LP twin ('lp') and of every prefix mixed path ('mixed_k')."""
        self.check_once(x)
        paths = ["q" * self.n] + [prefix_path(k, self.n) for k in range(1, self.n)]
        out = self.run_paths(x, paths)
        result = {"lp": out[paths[0]]}
        result.update({f"mixed_{k}": out[prefix_path(k, self.n)] for k in range(1, self.n)})
        return result

