"""Fake-quantization arithmetic of every quantizer, as pure functions.

Each quantizer's core is a `Core`: a forward function and a backward function written
out from the paper's equations (the gradients QAT papers define are straight-through
estimates, so they are stated, not derived). Both take tensors and plain Python numbers
only. `fake_quant(core, consts, x, *params)` runs them as one autograd node that saves
only its inputs, so a quantizer costs no activation memory beyond the tensor it reads.

`compiled(core)` hands both functions to torch.compile (`quant.compile=true`): each
elementwise chain then fuses into one loop. Python numbers (bit range, gradient scale,
delta) are traced as symbolic values and shapes are dynamic, so one compiled graph serves
every layer of a network. (Letting torch.compile differentiate a detach-trick expression
instead makes it save boolean masks for the backward, which measured 30-100x slower on
CPU than these hand-written backwards.)

Conventions: a per-channel parameter arrives shaped (C, 1, ..., 1) and its gradient is
returned in the same shape; "inside" masks are strict (a value on a clipping bound gets
no straight-through gradient), as torch.clamp's gradient.

Precision: the cores always compute in float32 (float64 stays float64), with autocast off,
whatever dtype the input has and whatever autocast state the caller is in: in bf16, x / s
rounds to the wrong integer (bf16 keeps 8 significant bits) and the step's gradient sums
in low precision. `fake_quant` upcasts x and the parameters (bf16 -> fp32 is exact) and
saves x in its own dtype (no extra activation memory). What it returns:
- outside autocast: the input's dtype (float32 in, exactly the float32 grid out);
- under autocast: float32, exactly on the grid, as autocast's own float32 ops (softmax,
  layer_norm) do; the conv or linear that reads it casts it to bf16 itself.
Gradients come back in the dtypes of x and of the parameters.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Core(NamedTuple):
    """forward(x, *params, *consts) -> y;  backward(g, x, *params, *consts) -> (dx, *dparams)."""

    forward: Callable
    backward: Callable


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a core computes in: float32, or float64 for float64 tensors."""
    return torch.promote_types(dtype, torch.float32)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    # Plain tensors, not nn.Parameters: torch.compile keeps parameter shapes static,
    # which would compile one graph per weight shape.
    return t.detach().to(compute_dtype(t.dtype))


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _full_precision(x: torch.Tensor):
    """Autocast off on x's device (a no-op context when it is off already)."""
    return torch.autocast(x.device.type, enabled=False)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, core, consts, x, *params):
        ctx.core, ctx.consts = core, consts
        ctx.save_for_backward(x, *params)
        with _full_precision(x):
            y = core.forward(_upcast(x), *map(_upcast, params), *consts)
        return y if _autocast_on(x.device.type) else y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, *params = ctx.saved_tensors
        with _full_precision(x):
            dx, *dparams = ctx.core.backward(_upcast(g).contiguous(), _upcast(x), *map(_upcast, params), *ctx.consts)
        return (None, None, dx.to(x.dtype), *(d.to(p.dtype) for d, p in zip(dparams, params, strict=True)))


def fake_quant(core: Core, consts: tuple, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """y = core.forward(x, *params, *consts), differentiated by core.backward."""
    return _FakeQuant.apply(core, consts, x, *params)


def reduce_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Sum t over the elements that share one entry of the parameter p: () or (C, 1, ..., 1)."""
    if p.dim() == 0:
        return t.sum()
    return t.sum(dim=tuple(range(1, t.dim())), keepdim=True)


# --- LSQ (Esser et al. 2020) -------------------------------------------------------------

def _lsq_forward(x, step, g: float, qn: int, qp: int):
    return torch.round(torch.clamp(x / step, qn, qp)) * step


def _lsq_backward(gy, x, step, g: float, qn: int, qp: int):
    v = x / step
    inside = (v > qn) & (v < qp)
    # eq. 3: d x_hat / d s = round(v) - v inside, Qn / Qp outside; times g (sec. 2.2)
    ds = torch.where(inside, torch.round(v) - v, torch.clamp(v, qn, qp).round())
    # eq. 5: straight-through inside the range, zero outside
    return torch.where(inside, gy, 0.0), reduce_like(gy * ds, step) * g


LSQ = Core(_lsq_forward, _lsq_backward)


def lsq_fake_quant(x, step, g: float, qn: int, qp: int, core: Core = LSQ):
    """LSQ (eq. 1-2): s * round(clamp(x / s, Qn, Qp)); step gradient eq. 3 scaled by g."""
    return fake_quant(core, (g, qn, qp), x, step)


# --- LSQ+ (Bhalgat et al. 2020) ----------------------------------------------------------

def _lsqplus_forward(x, step, offset, g: float, qn: int, qp: int):
    return torch.round(torch.clamp((x - offset) / step, qn, qp)) * step + offset


def _lsqplus_backward(gy, x, step, offset, g: float, qn: int, qp: int):
    v = (x - offset) / step
    inside = (v > qn) & (v < qp)
    ds = torch.where(inside, torch.round(v) - v, torch.clamp(v, qn, qp).round())  # eq. 5
    dbeta = torch.where(inside, 0.0, gy)  # eq. 6: 0 inside, 1 outside
    return torch.where(inside, gy, 0.0), reduce_like(gy * ds, step) * g, reduce_like(dbeta, offset) * g


LSQPLUS = Core(_lsqplus_forward, _lsqplus_backward)


def lsqplus_fake_quant(x, step, offset, g: float, qn: int, qp: int, core: Core = LSQPLUS):
    """LSQ+ (eq. 3-4): s * round(clamp((x - beta) / s, n, p)) + beta; gradients eq. 5-6, scaled by g."""
    return fake_quant(core, (g, qn, qp), x, step, offset)


# --- EWGS (Lee et al. 2021) on LSQ ----------------------------------------------------------

def _ewgs_backward(gy, x, step, g: float, qn: int, qp: int, delta: float):
    v = x / step
    inside = (v > qn) & (v < qp)
    r = torch.round(torch.clamp(v, qn, qp))
    # eq. 5: g_xn = g_xq * (1 + delta * sign(g_xq) * (x_n - x_q)), the rounding error
    # x_n - x_q measured on the [0, 1] normalised range: (v - round(v)) / (Qp - Qn).
    g_round = torch.where(inside, gy + gy.abs() * ((v - r) * (delta / (qp - qn))), 0.0)
    # LSQ's step gradient through the scaled round: r - v * (scaled gradient) / g_y
    ds = gy * r - g_round * v
    return g_round, reduce_like(ds, step) * g


def _ewgs_forward(x, step, g: float, qn: int, qp: int, delta: float):
    return _lsq_forward(x, step, g, qn, qp)


EWGS = Core(_ewgs_forward, _ewgs_backward)


def ewgs_fake_quant(x, step, g: float, qn: int, qp: int, delta: float, core: Core = EWGS):
    """EWGS on an LSQ quantizer: LSQ's forward; the round's gradient scaled element-wise."""
    return fake_quant(core, (g, qn, qp, delta), x, step)


# --- DoReFa (Zhou et al. 2016) ------------------------------------------------------------

def _group_sum(t, per_channel: bool):
    """Sum over the whole tensor, or over each output channel (kept as (C, 1, ..., 1))."""
    return t.sum(dim=tuple(range(1, t.dim())), keepdim=True) if per_channel else t.sum()


def _group_max(t, per_channel: bool):
    return t.amax(dim=tuple(range(1, t.dim())), keepdim=True) if per_channel else t.max()


def _dorefa_weight_forward(w, levels: int, per_channel: bool):
    t = torch.tanh(w)
    m = _group_max(t.abs(), per_channel)
    return 2 * torch.round((t / (2 * m) + 0.5) * levels) / levels - 1


def _dorefa_weight_backward(gy, w, levels: int, per_channel: bool):
    t = torch.tanh(w)
    a = t.abs()
    m = _group_max(a, per_channel)
    # quantize_k is straight-through (eq. 5), so with u = t / (2m) + 1/2 and w_q = 2 u - 1
    # (in value): d/dt = 1/m directly, plus the max's share -sum(g t)/m^2, spread evenly
    # over the elements that attain the max (as autograd spreads a max's gradient).
    top = a == m
    dm = -_group_sum(gy * t, per_channel) / (m * m)
    dt = gy / m + torch.where(top, torch.sign(t) * dm / _group_sum(top.float(), per_channel), 0.0)
    return (dt * (1 - t * t),)


DOREFA_WEIGHT = Core(_dorefa_weight_forward, _dorefa_weight_backward)


def dorefa_weight(w, levels: int, per_channel: bool, core: Core = DOREFA_WEIGHT):
    """DoReFa eq. 9: 2 * quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1, a grid in [-1, 1].

    The max is over the whole tensor, or over each output channel (dim 0) per-channel.
    Gradients flow through tanh and the max (as the paper's reference code does).
    """
    return fake_quant(core, (levels, per_channel), w)


def _dorefa_act_forward(x, levels: int, signed: bool):
    if signed:
        return 2 * torch.round((torch.clamp(x, -1, 1) + 1) * (levels / 2)) / levels - 1
    return torch.round(torch.clamp(x, 0, 1) * levels) / levels


def _dorefa_act_backward(gy, x, levels: int, signed: bool):
    lo = -1 if signed else 0
    return (torch.where((x > lo) & (x < 1), gy, 0.0),)


DOREFA_ACT = Core(_dorefa_act_forward, _dorefa_act_backward)


def dorefa_act(x, levels: int, signed: bool, core: Core = DOREFA_ACT):
    """DoReFa sec. 2.6: quantize_k(clip(x, 0, 1)), straight-through inside (0, 1).

    Signed inputs (no ReLU before the layer; not in the paper) use the weight grid of
    eq. 9 on clip(x, -1, 1).
    """
    return fake_quant(core, (levels, signed), x)


# --- PACT (Choi et al. 2018) --------------------------------------------------------------

def _pact_forward(x, alpha, qp: int, signed: bool):
    y = torch.minimum(x, alpha)
    y = torch.maximum(y, -alpha) if signed else torch.clamp(y, min=0)
    step = alpha / qp
    return torch.round(y / step) * step


def _pact_backward(gy, x, alpha, qp: int, signed: bool):
    # eq. 3: d y_q / d alpha = 1 where x >= alpha, else 0; d y_q / d x = 1 on [0, alpha).
    # Signed extension: also d y_q / d alpha = -1 where x <= -alpha; d y_q / d x = 1 on (-alpha, alpha).
    above = x >= alpha
    if signed:
        below = x <= -alpha
        dalpha = torch.where(above, gy, torch.where(below, -gy, 0.0))
        dx = torch.where(above | below, 0.0, gy)
    else:
        dalpha = torch.where(above, gy, 0.0)
        dx = torch.where(above | (x < 0), 0.0, gy)
    return dx, reduce_like(dalpha, alpha)


PACT = Core(_pact_forward, _pact_backward)


def pact_fake_quant(x, alpha, qp: int, signed: bool, core: Core = PACT):
    """PACT eq. 1-2: y = clip(x, 0, alpha), y_q = round(y * qp / alpha) * alpha / qp; gradients eq. 3.

    Signed inputs (not in the paper) clip to [-alpha, alpha] on a grid symmetric about 0.
    """
    return fake_quant(core, (qp, signed), x, alpha)


# --- compiled path -------------------------------------------------------------------------

_COMPILED: dict[Core, Core] = {}

# Per function: x rank (conv 4-D, linear 2-D) x parameter shape x signedness, under
# a dozen graphs; dynamo's default limit of 8 per function would fall back to eager.
_RECOMPILE_LIMIT = 32


def compiled(core: Core) -> Core:
    """`core` with both functions torch.compile'd (dynamic shapes), built once and shared by every layer."""
    if core not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
        _COMPILED[core] = Core(torch.compile(core.forward, dynamic=True), torch.compile(core.backward, dynamic=True))
    return _COMPILED[core]
