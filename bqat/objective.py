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
from dataclasses import dataclass, field, fields

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


def kl_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each row, from log-probabilities (sum over the last dim).

    Either side may be a stack of paths [P, B, C] and the other [B, C] (broadcast).
    """
    return (teacher.exp() * (teacher - student)).sum(-1)


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
    # Every term off unless asked: a key missing from a config is one that predates it (an
    # older run resumes with the objective it had), and a library user opts in. bqat-train's
    # defaults (w_kd=1, w_mp_kd=1: the CIFAR-10 ablation's best) live in conf/train.yaml.
    w_kd: float = 0.0
    T: float = 1.0
    w_mp_kd: float = 0.0
    mp_teacher_grad: bool = False
    path_weights: str = "uniform"
    # a_k / B per row of the mixed paths' logits, per (paths, n, B, device): built once, so a
    # step makes no host-to-device copy.
    _rows: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_cfg(cls, cfg) -> "Objective":
        """From a `loss` config (DictConfig, dict or None: the defaults); a bad value is one UserError line.

        Keys missing from an older config or checkpoint take the defaults above."""
        cfg = {} if cfg is None else cfg
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(names))
        if unknown:
            raise UserError(f"unknown loss key(s) {', '.join(unknown)}; known: {', '.join(names)}")
        teacher_grad = cfg.get("mp_teacher_grad", cls.mp_teacher_grad)
        if not isinstance(teacher_grad, bool):
            raise UserError(f"loss.mp_teacher_grad must be true or false, got {teacher_grad!r}")
        d = {f.name: f.default for f in fields(cls) if f.init}   # the defaults above, once
        return cls(
            w_mix=_number(cfg, "w_mix", d["w_mix"]),
            w_mix_decay=_choice(cfg, "w_mix_decay", d["w_mix_decay"], DECAYS),
            w_kd=_number(cfg, "w_kd", d["w_kd"]),
            T=_number(cfg, "T", d["T"], positive=True),
            w_mp_kd=_number(cfg, "w_mp_kd", d["w_mp_kd"]),
            mp_teacher_grad=teacher_grad,
            path_weights=_choice(cfg, "path_weights", d["path_weights"], PATH_WEIGHTS),
        )

    def decay(self, progress: float) -> float:
        """d: the factor of every mixed-path term at training progress in [0, 1]."""
        return mix_weight(1.0, self.w_mix_decay, progress)

    def weights(self, paths: list[str], n: int) -> list[float]:
        """a_k for the step's mixed paths, summing to 1."""
        raw = [path_weight(p, n, self.path_weights) for p in paths]
        total = sum(raw)
        return [w / total for w in raw]

    def row_weights(self, paths: list[str], n: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[P * B] row weights of the mixed paths' rows (in `paths` order): a_k / B for the CE
        terms, a_k * T^2 / B for the KL terms."""
        key = (tuple(paths), n, batch, device)
        if key not in self._rows:
            a = torch.tensor(self.weights(paths, n), dtype=torch.float32)
            rows = (a / batch).repeat_interleave(batch)
            self._rows[key] = (rows.to(device), (rows * (self.T * self.T)).to(device))
        return self._rows[key]

    def __call__(self, y: torch.Tensor, z_lp: torch.Tensor, z_mixed: torch.Tensor | None = None, paths=(), n: int = 0,
                 z_fp: torch.Tensor | None = None, progress: float = 0.0):
        """L and its terms (logs: detached tensors and floats; no host sync).

        z_lp: the twin's logits [B, C]. z_mixed: the mixed paths' logits [P * B, C], path after
        path in `paths` order (None or [] paths: no mixed path); n: the number of blocks (for the
        path weights). z_fp: the partner's logits (needed when w_kd > 0). Every term over paths
        is one call over all their rows, whatever P is: the step stays a fixed set of operators.
        """
        d, T = self.decay(progress), self.T
        ce_lp = F.cross_entropy(z_lp, y)
        loss, logs = ce_lp, {"ce/lp": ce_lp.detach(), "mix_decay": d}
        n_paths, batch = len(paths), z_lp.shape[0]
        if z_mixed is None or not n_paths:
            mixed = False
        else:
            mixed, (w, w_kl) = True, self.row_weights(paths, n, batch, z_lp.device)
            ce_rows = F.cross_entropy(z_mixed, y.repeat(n_paths), reduction="none")
            ce_mixed = torch.dot(ce_rows, w)  # sum_k a_k CE(z_k); fp32 under autocast too
            loss = loss + _scaled(ce_mixed, self.w_mix * d)
            with torch.no_grad():
                logs.update(zip((f"ce/{p}" for p in paths), ce_rows.view(n_paths, batch).mean(1).unbind()))
            logs["ce_mixed"], logs["w_mix"] = ce_mixed.detach(), self.w_mix * d
        teach_mixed = mixed and self.w_mp_kd > 0
        if self.w_kd > 0 or teach_mixed:
            student = F.log_softmax(z_lp / T, -1)
            log_mixed = F.log_softmax(z_mixed.view(n_paths, batch, -1) / T, -1) if mixed else None
        if self.w_kd > 0:
            teacher = F.log_softmax(z_fp / T, -1)
            kd_lp = kl_rows(teacher, student).mean() * (T * T)
            kd = kd_lp
            logs["kd/lp"] = kd_lp.detach()
            if mixed:
                kd_mixed = torch.dot(kl_rows(teacher, log_mixed).flatten(), w_kl)
                kd = kd + _scaled(kd_mixed, d)
                logs["kd/mixed"] = kd_mixed.detach()
            loss = loss + _scaled(kd, self.w_kd)
            logs["kd"] = kd.detach()
        if teach_mixed:
            teachers = log_mixed if self.mp_teacher_grad else log_mixed.detach()
            mp_kd = torch.dot(kl_rows(teachers, student).flatten(), w_kl)
            loss = loss + _scaled(mp_kd, self.w_mp_kd * d)
            logs["mp_kd"] = mp_kd.detach()
        return loss, logs


def _scaled(term: torch.Tensor, weight: float) -> torch.Tensor:
    # A weight of 1 (the defaults) costs no operator forward and backward.
    return term if weight == 1.0 else term * weight
