"""BlockReplacement: the LP twin trained with mixed-precision paths through a frozen FP partner.

A *path* is a string over {'q', 'f'}, one letter per block: 'q' runs the twin's block
Q_k, 'f' the partner's F_k. The LP backbone is 'qqqq'; the paper's mixed path k is
'q'*k + 'f'*(n-k); schedule `single` uses 'f'*(k-1) + 'q' + 'f'*(n-k). Paths are
evaluated through a prefix memo, so a shared prefix (h_k of the LP backbone) is computed
once per step and every path reuses it (DESIGN.md, step 2).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bqat.errors import UserError
from bqat.models.split import split_blocks
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
    """Trains `twin` (LP) with mixed paths through `partner` (FP, frozen, eval mode)."""

    def __init__(self, twin: nn.Module, partner: nn.Module, boundaries, schedule_cfg, loss_cfg, seed: int = 0):
        super().__init__()
        self.twin = twin
        self.partner = partner.eval()
        # Frozen: no updates and no weight gradients, but gradients flow through to inputs.
        for p in self.partner.parameters():
            p.requires_grad_(False)
        self.lp_blocks = split_blocks(twin, boundaries)
        self.fp_blocks = split_blocks(partner, boundaries)
        self.n = len(boundaries)
        self.schedule = build_schedule(schedule_cfg)
        self.loss_cfg = loss_cfg
        self.objective = Objective.from_cfg(loss_cfg)  # validated loss.* (bqat.objective)
        self._path_weights: dict[tuple, torch.Tensor] = {}  # a_k per (paths, device), built once
        self.progress = 0.0  # fraction of training done, set by the engine (w_mix decay)
        self.generator = torch.Generator().manual_seed(seed)
        # What run_paths calls for 'q' and 'f': the blocks, or compiled versions (bqat.accel).
        self.runners: dict[str, list] = {"q": list(self.lp_blocks), "f": list(self.fp_blocks)}

    def train(self, mode: bool = True):
        super().train(mode)
        self.partner.eval()  # BatchNorm of the partner always uses its running statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference is the twin alone: zero overhead."""
        return self.twin(x)

    def run_paths(self, x: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
        """Outputs of each path, computing each distinct prefix once."""
        memo: dict[str, torch.Tensor] = {"": x}
        for path in paths:
            for i in range(1, len(path) + 1):
                prefix = path[:i]
                if prefix in memo:
                    continue
                block = self.runners[prefix[-1]][i - 1]
                if prefix[-1] == "q" and "f" in prefix:
                    # Q_i on partner features (`single` paths): batch statistics, running
                    # statistics untouched; the LP path updates them, once per step.
                    with running_stats_frozen(self.twin):
                        memo[prefix] = block(memo[prefix[:-1]])
                elif "q" in prefix:
                    memo[prefix] = block(memo[prefix[:-1]])
                else:  # pure FP prefix: nothing trainable upstream, keep no graph
                    with torch.no_grad():
                        memo[prefix] = block(memo[prefix[:-1]])
        return {p: memo[p] for p in paths}

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n, objective = self.n, self.objective
        lp_path, fp_path = "q" * n, "f" * n
        mixed = self.schedule.paths(n, self.generator)
        wanted = [lp_path] + mixed + ([fp_path] if objective.w_kd > 0 else [])
        out = self.run_paths(x, wanted)
        z_mixed = torch.stack([out[p] for p in mixed]) if mixed else None
        loss, logs = objective(y, out[lp_path], z_mixed, mixed, self.path_weights(mixed, x.device) if mixed else None,
                               out.get(fp_path), self.progress)
        reg = quantizer_regularization(self.twin)  # e.g. PACT's L2 on its clip alpha
        if reg is not None:
            loss = loss + reg
            logs["reg/quant"] = reg.detach()
        logs["loss"] = loss.detach()
        logs["acc/lp"] = (out[lp_path].argmax(1) == y).float().mean().detach()
        return loss, logs

    def path_weights(self, paths: list[str], device: torch.device) -> torch.Tensor:
        """a_k of `paths` (bqat.objective), cached on the device: no host-to-device copy per step."""
        key = (tuple(paths), device)
        if key not in self._path_weights:
            self._path_weights[key] = torch.tensor(self.objective.weights(paths, self.n), device=device)
        return self._path_weights[key]

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of the LP twin ('lp') and of every prefix mixed path ('mixed_k')."""
        paths = ["q" * self.n] + [prefix_path(k, self.n) for k in range(1, self.n)]
        out = self.run_paths(x, paths)
        result = {"lp": out[paths[0]]}
        result.update({f"mixed_{k}": out[prefix_path(k, self.n)] for k in range(1, self.n)})
        return result

