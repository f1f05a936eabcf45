"""BlockReplacement: the LP twin trained with mixed-precision paths through a frozen FP partner.

A *path* is a string over {'q', 'f'}, one letter per block: 'q' runs the twin's block
Q_k, 'f' the partner's F_k. The LP backbone is 'qqqq'; the paper's mixed path k is
'q'*k + 'f'*(n-k); schedule `single` uses 'f'*(k-1) + 'q' + 'f'*(n-k). Paths are
evaluated through a prefix memo, so a shared prefix (h_k of the LP backbone) is computed
once per step and every path reuses it (DESIGN.md, step 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bqat.blocks import block_cut, check_blocks, check_names, probe, shared_parameter
from bqat.config import loss_config, named_config
from bqat.errors import BadArgument, UserError
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


def mix_weight(w_mix: float, decay: str, progress: float) -> float:
    """w_mix at training progress in [0, 1]: constant, or decayed to 0 (linear / cosine)."""
    if decay == "constant":
        return w_mix
    if decay == "linear":
        return w_mix * (1.0 - progress)
    if decay == "cosine":
        return w_mix * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UserError(f"unknown loss.w_mix_decay {decay!r}; choose constant, linear or cosine")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al. 2015)."""
    return F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="batchmean", log_target=True) * T * T


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
        self.progress = 0.0  # fraction of training done, set by the engine (w_mix decay)
        self.generator = torch.Generator().manual_seed(seed)
        # What run_paths calls for 'q' and 'f': the blocks, or compiled versions (bqat.accel).
        self.runners: dict[str, list] = {"q": list(self.lp_blocks), "f": list(self.fp_blocks)}

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
        memo: dict[str, torch.Tensor] = {"": x}
        for path in paths:
            for i in range(1, len(path) + 1):
                prefix = path[:i]
                if prefix in memo:
                    continue
                block = self.runners[prefix[-1]][i - 1]
                if "q" in prefix:
                    memo[prefix] = block(memo[prefix[:-1]])
                else:  # pure FP prefix: nothing trainable upstream, keep no graph
                    with torch.no_grad():
                        memo[prefix] = block(memo[prefix[:-1]])
        return {p: memo[p] for p in paths}

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_once(x)
        n, cfg = self.n, self.loss_cfg
        lp_path, fp_path = "q" * n, "f" * n
        mixed = self.schedule.paths(n, self.generator)
        wanted = [lp_path] + mixed + ([fp_path] if cfg.w_kd > 0 else [])
        out = self.run_paths(x, wanted)

        ce_lp = F.cross_entropy(out[lp_path], y)
        logs = {"ce/lp": ce_lp.detach()}
        loss = ce_lp
        if mixed:
            ce_mixed = [F.cross_entropy(out[p], y) for p in mixed]
            for p, ce in zip(mixed, ce_mixed):
                logs[f"ce/{p}"] = ce.detach()
            w_mix = mix_weight(cfg.w_mix, cfg.w_mix_decay, self.progress)
            loss = loss + w_mix * torch.stack(ce_mixed).mean()
            logs["w_mix"] = torch.tensor(w_mix)
        if cfg.w_kd > 0:
            z0 = out[fp_path]
            kd = kd_loss(out[lp_path], z0, cfg.T)
            if mixed:
                kd = kd + torch.stack([kd_loss(out[p], z0, cfg.T) for p in mixed]).mean()
            loss = loss + cfg.w_kd * kd
            logs["kd"] = kd.detach()
        reg = quantizer_regularization(self.twin)  # e.g. PACT's L2 on its clip alpha
        if reg is not None:
            loss = loss + reg
            logs["reg/quant"] = reg.detach()
        logs["loss"] = loss.detach()
        logs["acc/lp"] = (out[lp_path].argmax(1) == y).float().mean().detach()
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

