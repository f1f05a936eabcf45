"""The objective of one BlockReplacement step (DESIGN.md, "The method, precisely", step 4).

    L = CE(z_n, y)
      + d * w_mix   * sum_k a_k CE(z_k, y)                         mixed paths learn the task
      + w_kd        * [KL(z_0||z_n) + d * sum_k a_k KL(z_0||z_k)]   the partner teaches
      + d * w_mp_kd * sum_k a_k KL(z_k||z_n)                        the mixed paths teach the twin
      (+ the quantizers' regularisers, added by the caller)

z_n are the twin's logits, z_k those of the mixed paths this step uses, z_0 the frozen
partner's. KL(p||q) is taken at temperature T and scaled by T^2 (Hinton et al. 2015), like
`kd_loss`. d is the `w_mix_decay` factor (1 throughout, or 1 -> 0 over training): it scales
every mixed-path term together, so a decayed run ends on the twin's own CE(z_n) and
KL(z_0||z_n). In the last term the mixed paths are teachers: detached unless
`mp_teacher_grad`, which lets the term also pull them towards the twin.

a_k are the path weights (`path_weights`), normalised to sum 1 over the paths of the step:
`uniform` (1/P), or `geometric`, path k in proportion to 1/2^(n-k) where k is the path's
last twin block: the prefix path Q_1..Q_k F_{k+1}..F_n, the single path ..Q_k.. (as the
authors' Block-KD weighs its stepping-stone networks, the twin-most path the most). A step
of `sampled` has one path, of weight 1 under either rule (its draw stays uniform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from bqat.errors import UserError

DECAYS = ("constant", "linear", "cosine")
PATH_WEIGHTS = ("uniform", "geometric")


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


def kl_per_path(teacher: torch.Tensor, student: torch.Tensor, T: float) -> torch.Tensor:
    """KL(teacher || student) * T^2, batch mean, from log-probabilities at temperature T.

    [B, C] against [B, C] gives a scalar; a stack of paths [P, B, C] on either side (the
    other broadcast) gives one value per path, [P], in one call whatever P is.
    """
    batch = student.shape[-2]
    return (teacher.exp() * (teacher - student)).sum((-2, -1)) * (T * T / batch)


def path_weight(path: str, n: int, kind: str) -> float:
    """Unnormalised weight of a mixed path: 1, or 1/2^(n-k) with k its last twin block."""
    if kind == "uniform":
        return 1.0
    k = path.rfind("q") + 1
    return 2.0 ** -(n - k)


def _number(cfg, key: str, default: float, positive: bool = False) -> float:
    value = cfg.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise UserError(f"loss.{key} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _choice(cfg, key: str, default: str, choices) -> str:
    value = cfg.get(key, default)
    if value not in choices:
        raise UserError(f"loss.{key}={value!r}; choose {', '.join(choices[:-1])} or {choices[-1]}")
    return str(value)


@dataclass(frozen=True)
class Objective:
    """The loss weights of a run (`loss.*`), validated; calling it computes L and its logs."""

    w_mix: float = 1.0
    w_mix_decay: str = "constant"
    w_kd: float = 0.0
    T: float = 1.0
    w_mp_kd: float = 0.0
    mp_teacher_grad: bool = False
    path_weights: str = "uniform"

    @classmethod
    def from_cfg(cls, cfg) -> "Objective":
        """From a `loss` config (DictConfig, dict or None: the defaults); a bad value is one UserError line.

        Keys missing from an older config or checkpoint take the defaults above."""
        cfg = {} if cfg is None else cfg
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(names))
        if unknown:
            raise UserError(f"unknown loss key(s) {', '.join(unknown)}; known: {', '.join(names)}")
        teacher_grad = cfg.get("mp_teacher_grad", False)
        if not isinstance(teacher_grad, bool):
            raise UserError(f"loss.mp_teacher_grad must be true or false, got {teacher_grad!r}")
        return cls(
            w_mix=_number(cfg, "w_mix", 1.0),
            w_mix_decay=_choice(cfg, "w_mix_decay", "constant", DECAYS),
            w_kd=_number(cfg, "w_kd", 0.0),
            T=_number(cfg, "T", 1.0, positive=True),
            w_mp_kd=_number(cfg, "w_mp_kd", 0.0),
            mp_teacher_grad=teacher_grad,
            path_weights=_choice(cfg, "path_weights", "uniform", PATH_WEIGHTS),
        )

    def decay(self, progress: float) -> float:
        """d: the factor of every mixed-path term at training progress in [0, 1]."""
        return mix_weight(1.0, self.w_mix_decay, progress)

    def weights(self, paths: list[str], n: int) -> list[float]:
        """a_k for the step's mixed paths, summing to 1."""
        raw = [path_weight(p, n, self.path_weights) for p in paths]
        total = sum(raw)
        return [w / total for w in raw]

    def __call__(self, y: torch.Tensor, z_lp: torch.Tensor, z_mixed: torch.Tensor | None = None, paths=(),
                 a: torch.Tensor | None = None, z_fp: torch.Tensor | None = None, progress: float = 0.0):
        """L and its terms (logs: detached tensors and floats, no host sync).

        z_lp: the twin's logits [B, C]; z_mixed: the mixed paths' [P, B, C] (None: no mixed
        path), named by `paths` and weighted by `a` [P]; z_fp: the partner's (needed when w_kd > 0).
        Every term over paths is one call over the stack, whatever P is.
        """
        d, T = self.decay(progress), self.T
        ce_lp = F.cross_entropy(z_lp, y)
        loss, logs = ce_lp, {"ce/lp": ce_lp.detach(), "mix_decay": d}
        mixed = z_mixed is not None and z_mixed.shape[0] > 0
        if mixed:
            n_paths, batch = z_mixed.shape[0], z_mixed.shape[1]
            ce = F.cross_entropy(z_mixed.flatten(0, 1), y.repeat(n_paths), reduction="none").view(n_paths, batch).mean(1)
            ce_mixed = (a * ce).sum()
            loss = loss + (self.w_mix * d) * ce_mixed
            logs.update(zip((f"ce/{p}" for p in paths), ce.detach().unbind()))
            logs["ce_mixed"], logs["w_mix"] = ce_mixed.detach(), self.w_mix * d
        teach_mixed = mixed and self.w_mp_kd > 0
        if self.w_kd > 0 or teach_mixed:
            student = F.log_softmax(z_lp / T, -1)
            log_mixed = F.log_softmax(z_mixed / T, -1) if mixed else None
        if self.w_kd > 0:
            teacher = F.log_softmax(z_fp / T, -1)
            kd_lp = kl_per_path(teacher, student, T)
            kd = kd_lp
            logs["kd/lp"] = kd_lp.detach()
            if mixed:
                kd_mixed = (a * kl_per_path(teacher, log_mixed, T)).sum()
                kd = kd + d * kd_mixed
                logs["kd/mixed"] = kd_mixed.detach()
            loss = loss + self.w_kd * kd
            logs["kd"] = kd.detach()
        if teach_mixed:
            teachers = log_mixed if self.mp_teacher_grad else log_mixed.detach()
            mp_kd = (a * kl_per_path(teachers, student, T)).sum()
            loss = loss + (self.w_mp_kd * d) * mp_kd
            logs["mp_kd"] = mp_kd.detach()
        return loss, logs
