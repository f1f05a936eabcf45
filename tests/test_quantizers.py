"""LSQ+, PACT, DoReFa and EWGS against their papers' equations, on hand-made tensors.

Equation numbers are those of the arXiv versions: LSQ+ 2004.09576, PACT 1805.06085,
DoReFa-Net 1606.06160, EWGS 2104.00903 (CVPR 2021).
"""

import math

import pytest
import timm
import torch
from omegaconf import OmegaConf

import bqat.models  # noqa: F401
from bqat.errors import UserError
from bqat.models import default_boundaries
from bqat.quant import QUANTIZERS, get_quantizer, make_twin, quantizer_regularization
from bqat.replace import BlockReplacement

LSQPlus, PACT, DoReFa, EWGS, LSQ = (get_quantizer(n) for n in ("lsqplus", "pact", "dorefa", "ewgs", "lsq"))


def ready(q, signed=None, **params):
    """Mark q initialised with the given parameter values (skips data-dependent init)."""
    for name, value in params.items():
        getattr(q, name).data = torch.as_tensor(value, dtype=torch.float32).reshape(getattr(q, name).shape)
    q.initialized = True
    if signed is not None:
        q.signed = signed
    return q


def grads(q, x, dy):
    """(y, dL/dx, {param: grad}) for L = sum(y * dy)."""
    x = x.clone().requires_grad_(True)
    y = q(x)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in q.named_parameters()}


def test_registry_holds_the_five_quantizers_with_one_constructor_signature():
    assert {"lsq", "lsqplus", "pact", "dorefa", "ewgs"} <= set(QUANTIZERS)
    x = torch.randn(2, 3, 4, 4)
    for name, cls in QUANTIZERS.items():
        for kind in ("weight", "act"):
            q = cls(4, kind, per_channel=True, channels=2)
            assert q(x).shape == x.shape, name


# --- LSQ+ -----------------------------------------------------------------------------------

def test_lsqplus_forward_is_eq_3_4():
    """Eq. 3-4: x_bar = round(clamp((x - beta) / s, n, p)), x_hat = x_bar * s + beta; n = 0, p = 2^b - 1."""
    x = torch.tensor([[-2.0, -0.95, -0.31, 0.0, 0.12, 0.58, 1.01, 3.0]])
    s, beta = 0.4, -0.7
    q = ready(LSQPlus(2, "act"), step=s, offset=beta, signed=False)
    expected = torch.round(torch.clamp((x - beta) / s, 0, 3)) * s + beta
    assert torch.allclose(q(x), expected, atol=1e-7)
    # the offset moves the grid: its lowest level is beta, not 0
    assert q(x).min().item() == pytest.approx(beta)


def test_lsqplus_gradients_are_eq_5_6_scaled_by_g():
    """Eq. 5: dx_hat/ds = round(v) - v inside, n or p outside; eq. 6: dx_hat/dbeta = 0 inside,
    1 outside; v = (x - beta) / s; both times g = 1/sqrt(N p) as in LSQ; dx_hat/dx = 1 inside."""
    x = torch.tensor([[-2.0, -0.95, -0.31, 0.12, 0.58, 0.93, 3.0]])
    s, beta, n, p = 0.4, -0.7, 0, 3
    q = ready(LSQPlus(2, "act"), step=s, offset=beta, signed=False)
    dy = torch.tensor([[0.3, -1.0, 2.0, 0.5, -0.25, 1.5, 0.7]])
    _, dx, pg = grads(q, x, dy)
    v = (x - beta) / s
    inside = (v > n) & (v < p)
    ds = torch.where(inside, torch.round(v) - v, torch.where(v <= n, float(n), float(p)))
    dbeta = torch.where(inside, 0.0, 1.0)
    g = 1 / math.sqrt(x[0].numel() * p)
    assert pg["step"].item() == pytest.approx((dy * ds).sum().item() * g, rel=1e-5)
    assert pg["offset"].item() == pytest.approx((dy * dbeta).sum().item() * g, rel=1e-6)
    assert torch.equal(dx, dy * inside)


def test_lsqplus_weight_init_is_eq_7():
    """Eq. 7: s_init = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1), per tensor or per channel; weights symmetric."""
    w = torch.tensor([[0.5, -1.0, 2.0, 0.1], [0.3, 0.3, -0.2, 0.4]])
    q = LSQPlus(3, "weight")
    q(w)
    mu, sigma = w.mean(), w.std()
    assert q.step.item() == pytest.approx(max(abs(mu - 3 * sigma), abs(mu + 3 * sigma)).item() / 4, rel=1e-6)
    assert q.offset is None and (q.qn, q.qp) == (-4, 3)
    qc = LSQPlus(3, "weight", per_channel=True, channels=2)
    qc(w)
    expected = [max(abs(r.mean() - 3 * r.std()), abs(r.mean() + 3 * r.std())).item() / 4 for r in w]
    assert qc.step.tolist() == pytest.approx(expected, rel=1e-6)


def test_lsqplus_activation_init_minimises_the_mse_of_eq_9():
    """Eq. 9: (s, beta)_init = argmin ||x_hat - x||^2 on the first batch; it beats min/max (eq. 8)
    and is close to a dense brute-force search; the offset captures negative inputs."""
    torch.manual_seed(0)
    z = torch.randn(64, 32)
    x = z * torch.sigmoid(z)  # Swish: a skewed range with negative values, LSQ+'s motivating case
    q = LSQPlus(2, "act")
    q(x)
    assert not q.signed and q.offset.item() < 0

    def mse(s, beta):  # s, beta: equal-shaped tensors of candidates
        s, beta = s.reshape(-1, 1, 1), beta.reshape(-1, 1, 1)
        return ((torch.round(torch.clamp((x - beta) / s, 0, 3)) * s + beta - x) ** 2).mean(dim=(1, 2))

    found = mse(q.step.detach(), q.offset.detach()).item()
    lo, hi = x.min(), x.max()
    assert found < mse((hi - lo) / 3, lo).item()  # eq. 8, min/max
    a, b = torch.meshgrid(torch.linspace(lo, 0, 60), torch.linspace(0.2, hi, 150), indexing="ij")
    assert found <= mse((b - a) / 3, a).min().item() * 1.01  # a dense brute-force search


def test_lsqplus_activation_init_on_a_padded_map_matches_the_full_tensor_init(monkeypatch):
    """The init reads a seeded random sample of a large batch, not a fixed stride: on a
    power-of-two padded conv+ReLU map a stride picks the zero-padded border column only.
    Within 5 % of the search on every element, the same for the same batch, global RNG untouched."""
    from bqat.quant import lsqplus

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)
    with torch.no_grad():
        x = torch.relu(conv(torch.rand(64, 3, 32, 32)))  # 2^20 elements: sampled
    assert x.numel() > lsqplus.MSE_SAMPLE
    rng = torch.get_rng_state()
    s, beta = lsqplus.mse_init(x, 0, 3)
    assert torch.equal(torch.get_rng_state(), rng) and lsqplus.mse_init(x, 0, 3) == (s, beta)
    monkeypatch.setattr(lsqplus, "MSE_SAMPLE", x.numel())
    s_full, beta_full = lsqplus.mse_init(x, 0, 3)
    assert s == pytest.approx(s_full, rel=0.05) and beta == pytest.approx(beta_full, rel=0.05)
    assert beta_full > 0  # the ReLU map's zeros and the border pull the range's bottom; it is not 0


def test_lsqplus_export_zero_point_reproduces_the_grid():
    """x_q = scale * (code - zero_point) with integer code in [0, 2^b - 1]; zero_point = -beta / s."""
    q = ready(LSQPlus(3, "act"), step=0.25, offset=-0.6, signed=False)
    xq = q(torch.linspace(-1, 2, 50)[None])
    scale, zp = q.scale_zero_point()
    code = xq / scale + zp
    assert torch.allclose(code, code.round(), atol=1e-5) and code.min() >= 0 and code.max() <= 7


# --- PACT ----------------------------------------------------------------------------------

def test_pact_forward_is_eq_1_2():
    """Eq. 1: y = 0.5 (|x| - |x - alpha| + alpha); eq. 2: y_q = round(y (2^k - 1) / alpha) alpha / (2^k - 1)."""
    x = torch.tensor([-1.0, 0.0, 0.3, 0.8, 1.4, 2.49, 2.5, 7.0])
    alpha = 2.5
    q = ready(PACT(2, "act"), alpha=alpha, signed=False)
    y = 0.5 * (x.abs() - (x - alpha).abs() + alpha)
    expected = torch.round(y * 3 / alpha) * alpha / 3
    assert torch.allclose(q(x), expected, atol=1e-6)


def test_pact_gradients_are_eq_3():
    """Eq. 3: dy_q/dalpha = 1 where x >= alpha, else 0 (STE through the round); dy_q/dx = 1 on [0, alpha)."""
    x = torch.tensor([-1.0, 0.3, 0.8, 1.4, 2.49, 2.5, 7.0])
    dy = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.0, 3.0, -0.5])
    q = ready(PACT(2, "act"), alpha=2.5, signed=False)
    _, dx, pg = grads(q, x, dy)
    assert pg["alpha"].item() == pytest.approx((3.0 - 0.5))
    assert dx.tolist() == [0.0, -1.0, 2.0, 0.25, 1.0, 0.0, 0.0]


def test_pact_signed_inputs_clip_symmetrically():
    """Extension for inputs with negative values: clip to [-alpha, alpha], dy_q/dalpha = -1 where x <= -alpha."""
    x = torch.tensor([-3.0, -0.9, 0.2, 3.0])
    q = ready(PACT(3, "act"), alpha=1.5, signed=True)
    dy = torch.tensor([1.0, 1.0, 1.0, 2.0])
    y, dx, pg = grads(q, x, dy)
    assert (q.qn, q.qp) == (-3, 3)
    assert torch.allclose(y, torch.round(x.clamp(-1.5, 1.5) * 3 / 1.5) * 1.5 / 3)
    assert pg["alpha"].item() == pytest.approx(2.0 - 1.0)
    assert dx.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_pact_weights_are_dorefa():
    """PACT quantizes weights with DoReFa's scheme (PACT sec. 4)."""
    w = torch.randn(4, 3, 3, 3)
    assert torch.equal(PACT(2, "weight")(w), DoReFa(2, "weight")(w))
    assert PACT(2, "weight").alpha is None


def test_pact_alpha_l2_regulariser_enters_the_block_replacement_loss():
    """The L2 term lambda/2 * alpha^2 of every activation quantizer is added to the loss and logged."""
    torch.manual_seed(0)
    fp = timm.create_model("resnet20", num_classes=10).eval()
    quant = OmegaConf.create({"name": "pact", "per_channel": False, "alpha_init": 4.0, "alpha_decay": 0.01})
    twin = make_twin(fp, quant, OmegaConf.create({"w": 2, "a": 2, "first_last": 8}))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    twin(x)
    alphas = [m.alpha for m in twin.modules() if isinstance(m, PACT) and m.alpha is not None]
    assert len(alphas) == 20
    reg = quantizer_regularization(twin)
    assert reg.item() == pytest.approx(20 * 0.5 * 0.01 * 16.0)
    loss_cfg = OmegaConf.create({"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0, "w_mp_kd": 0.0})
    hybrid = BlockReplacement(twin, fp, default_boundaries(fp), OmegaConf.create({"name": "none"}), loss_cfg).train()
    loss, logs = hybrid.training_step(x, y)
    assert logs["reg/quant"].item() == pytest.approx(reg.item())
    assert loss.item() == pytest.approx(logs["ce/lp"].item() + reg.item(), rel=1e-6)
    assert quantizer_regularization(make_twin(fp, OmegaConf.create({"name": "lsq", "per_channel": False}),
                                              OmegaConf.create({"w": 2, "a": 2, "first_last": 8}))) is None


def test_pact_regulariser_gradient_is_weight_decay_on_alpha():
    q = ready(PACT(2, "act", alpha_decay=0.1), alpha=3.0, signed=False)
    q.regularizer().backward()
    assert q.alpha.grad.item() == pytest.approx(0.1 * 3.0)


# --- DoReFa -----------------------------------------------------------------------------------

def dorefa_eq9(w, k, dims=None):
    """Eq. 9 written out with eq. 5's quantize_k; round is straight-through (detach trick)."""
    t = torch.tanh(w)
    m = t.abs().amax(dim=dims, keepdim=True) if dims else t.abs().max()
    r = t / (2 * m) + 0.5
    n = 2**k - 1
    qk = (r * n).round().detach() + (r * n - (r * n).detach())
    return 2 * qk / n - 1


@pytest.mark.parametrize("per_channel", [False, True])
def test_dorefa_weights_are_eq_9_values_and_gradients(per_channel):
    """Eq. 9: w_q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1, gradients through tanh and max."""
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 3)
    dy = torch.randn_like(w)
    q = DoReFa(3, "weight", per_channel=per_channel, channels=3)
    y, dx, _ = grads(q, w, dy)
    wr = w.clone().requires_grad_(True)
    ref = dorefa_eq9(wr, 3, (1, 2, 3) if per_channel else None)
    (ref * dy).sum().backward()
    assert torch.allclose(y, ref, atol=1e-6)
    assert torch.allclose(dx, wr.grad, atol=1e-5)
    levels = ((y + 1) * 7 / 2).round()
    assert y.min() >= -1 and y.max() <= 1 and levels.unique().numel() <= 8
    # per tensor, the largest |w| maps to +-1; per channel, the largest of every channel does
    ext = y.abs().amax(dim=(1, 2, 3)) if per_channel else y.abs().max()[None]
    assert torch.all(ext == 1)


def test_dorefa_activations_are_quantize_k_of_clip_0_1():
    """Sec. 2.6 with eq. 5: a_q = round((2^k - 1) clip(a, 0, 1)) / (2^k - 1); gradient 1 inside (0, 1), else 0."""
    x = torch.tensor([-0.5, 0.1, 0.2, 0.5, 0.84, 1.0, 1.7])
    q = ready(DoReFa(2, "act"), signed=False)
    y, dx, _ = grads(q, x, torch.ones_like(x))
    assert torch.allclose(y, torch.round(x.clamp(0, 1) * 3) / 3)
    assert dx.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    scale, zp = q.scale_zero_point()
    assert (scale.item(), zp.item()) == pytest.approx((1 / 3, 0.0))


def test_dorefa_normalised_grid_in_export_terms():
    """Weights: x_q = (2/L) * (code - L/2), integer code in [0, L] (the eq. 9 grid on [-1, 1])."""
    q = DoReFa(2, "weight")
    wq = q(torch.randn(8, 4, 3, 3))
    scale, zp = q.scale_zero_point()
    assert (scale.item(), zp.item(), q.qn, q.qp) == pytest.approx((2 / 3, 1.5, 0, 3))
    code = wq / scale + zp
    assert torch.allclose(code, code.round(), atol=1e-5) and code.min() >= 0 and code.max() <= 3


# --- EWGS -------------------------------------------------------------------------------------

def test_ewgs_forward_is_lsq_and_delta_zero_is_lsq_exactly():
    """EWGS changes only the backward; with delta = 0 it is the straight-through estimator (LSQ)."""
    torch.manual_seed(2)
    x, dy = torch.randn(2, 40), torch.randn(2, 40)
    e, l0 = ready(EWGS(3, "act", delta=0.0), step=0.3, signed=True), ready(LSQ(3, "act"), step=0.3, signed=True)
    ye, dxe, ge = grads(e, x, dy)
    yl, dxl, gl = grads(l0, x, dy)
    assert torch.equal(ye, yl) and torch.equal(dxe, dxl)
    assert ge["step"].item() == pytest.approx(gl["step"].item(), rel=1e-6)


def test_ewgs_input_gradient_is_eq_5():
    """Eq. 5: g_xn = g_xq (1 + delta sign(g_xq) (x_n - x_q)); x_n - x_q = (v - round(v)) / (Qp - Qn) on the
    [0, 1] normalised range, v = x / s; zero outside the clipping range (as LSQ)."""
    v = torch.tensor([[-5.0, -1.7, -1.2, -0.4, 0.3, 0.45, 1.55, 2.2, 4.0]])
    s, delta = 0.5, 2.0
    q = ready(EWGS(3, "act", delta=delta), step=s, signed=True)  # grid [-4, 3]
    dy = torch.tensor([[1.0, 2.0, -1.0, 0.5, -2.0, 1.0, -0.5, 3.0, 1.0]])
    _, dx, pg = grads(q, v * s, dy)
    inside = (v > -4) & (v < 3)
    err = (v - v.round()) / 7
    expected = torch.where(inside, dy * (1 + delta * dy.sign() * err), 0.0)
    assert torch.allclose(dx, expected, atol=1e-6)
    # the step gradient is LSQ's eq. 3 with the scaled round: sum dy r - sum g_xn v (inside)
    r = v.clamp(-4, 3).round()
    g = 1 / math.sqrt(v.numel() * 3)
    assert pg["step"].item() == pytest.approx(((dy * r).sum() - (expected * v).sum()).item() * g, rel=1e-5)


def test_ewgs_scaling_factor_depends_on_the_gradient_sign():
    """Eq. 5's factor 1 + delta sign(g) (x_n - x_q): one rounding error enlarges a positive
    gradient and shrinks a negative one (here x_n - x_q = 0.3 / 3 = 0.1, delta = 3)."""
    q = ready(EWGS(2, "act", delta=3.0), step=1.0, signed=False)  # grid [0, 3]
    x = torch.tensor([[1.3, 1.3]])
    _, dx, _ = grads(q, x, torch.tensor([[1.0, -1.0]]))
    assert dx.tolist()[0] == pytest.approx([1.3, -0.7])


def test_bad_quantizer_options_are_one_line_user_errors():
    fp = timm.create_model("resnet20", num_classes=10)
    bits = OmegaConf.create({"w": 2, "a": 2, "first_last": 8})
    with pytest.raises(UserError, match="quant.delat"):
        make_twin(fp, OmegaConf.create({"name": "ewgs", "per_channel": False, "delat": 0.1}), bits)
    with pytest.raises(UserError, match="quant.delta"):
        make_twin(fp, OmegaConf.create({"name": "ewgs", "per_channel": False, "delta": -1}), bits)
    with pytest.raises(UserError, match="alpha_init"):
        make_twin(fp, OmegaConf.create({"name": "pact", "per_channel": False, "alpha_init": 0}), bits)


# --- precision ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 2])
def test_every_quantizer_computes_in_fp32_under_bf16_autocast(bits):
    """Under autocast a quantizer gets bf16 activations; it computes in fp32 anyway: the same
    init, output and gradients as on the fp32 copy of its input, the output exactly on the
    grid (float32; the conv after it casts), the input gradient in the input's dtype.
    Outside autocast a bf16 input gives the fp32 result rounded to bf16."""
    torch.manual_seed(4)
    x = (torch.randn(4, 8, 6, 6) * 1.5).bfloat16()  # an activation as a bf16 conv hands it on
    w = torch.randn(8, 8, 3, 3)  # the fp32 master weights
    dx_out, dw_out = torch.randn(4, 8, 6, 6).bfloat16().float(), torch.randn_like(w)
    for name, cls in sorted(QUANTIZERS.items()):
        for kind, inp, dy in (("act", x, dx_out), ("weight", w, dw_out)):
            ref = cls(bits, kind)
            y_ref, dx_ref, g_ref = grads(ref, inp.float(), dy)  # initialised in fp32 too
            q = cls(bits, kind)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y, dx, g = grads(q, inp, dy)
            case = (name, kind, bits)
            for key, value in ref.state_dict().items():
                assert (torch.equal(value, q.state_dict()[key]) if torch.is_tensor(value) else value == q.state_dict()[key]), case
            assert torch.equal(y.float(), y_ref) and y.dtype == torch.float32, case
            scale, zero_point = q.scale_zero_point()
            code = y / scale + zero_point
            assert (code - code.round()).abs().max() < 1e-3, case
            assert code.round().unique().numel() <= 2**bits, case
            assert dx.dtype == inp.dtype and torch.equal(dx, dx_ref.to(inp.dtype)), case
            for p in g_ref:  # the step / offset / alpha gradients
                assert torch.allclose(g[p], g_ref[p], rtol=1e-6, atol=0), (*case, p)
            if kind == "act":
                assert torch.equal(q(x), y_ref.bfloat16()), case


# --- compiled path ----------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_cores_equal_eager_values_and_gradients():
    """quant.compile=true runs the same forward/backward formulas through torch.compile.

    Every core once: each quantizer's activation path, and DoReFa's weight path (PACT's
    weights are DoReFa's; LSQ-style weights share their activation core).
    """
    torch.manual_seed(3)
    x = torch.randn(4, 6, 5, 5) * 2
    dy = torch.randn_like(x)
    cases = [(name, "act") for name in sorted(QUANTIZERS)] + [("dorefa", "weight")]
    for name, kind in cases:
        eager, comp = (QUANTIZERS[name](3, kind, compile=c) for c in (False, True))
        eager(x)  # data-dependent init, then the same state in both
        comp.load_state_dict(eager.state_dict())
        (y0, dx0, g0), (y1, dx1, g1) = grads(eager, x, dy), grads(comp, x, dy)
        assert torch.allclose(y0, y1, atol=1e-5), (name, kind)
        assert torch.allclose(dx0, dx1, atol=1e-5), (name, kind)
        for p in g0:
            assert torch.allclose(g0[p], g1[p], rtol=1e-4, atol=1e-5), (name, kind, p)


# --- positive step sizes (bqat.quant.base: SCALE_FLOOR, keep_scales_positive) -------------

def _act_quantizer(name):
    torch.manual_seed(0)
    q = get_quantizer(name)(2, "act")
    q(torch.rand(64, 8))  # data-dependent init; sets the floor
    return q


@pytest.mark.parametrize("name", ["lsq", "lsqplus", "ewgs", "pact"])
def test_a_step_driven_negative_by_a_huge_gradient_stays_positive(name):
    from bqat.quant import keep_scales_positive
    from bqat.quant.base import SCALE_FLOOR

    q = _act_quantizer(name)
    (scale,) = q.scales()
    init = float(scale.detach())
    assert q.floor == pytest.approx(SCALE_FLOOR * init) and q.floor > 0
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    keep_scales_positive(opt, q)
    for p in q.parameters():
        p.grad = torch.zeros_like(p)
    scale.grad.fill_(1e8)  # what a zero-variance BatchNorm channel sends into a depthwise twin
    opt.step()
    assert float(scale.detach()) == pytest.approx(q.floor)  # projected onto the floor, not -5e6
    x = torch.rand(64, 8).requires_grad_(True)
    y = q(x)
    assert torch.isfinite(y).all()
    scale.grad = None
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and scale.grad.abs().sum() > 0  # on the floor it still learns


@pytest.mark.parametrize("name", ["lsq", "lsqplus", "ewgs", "pact"])
def test_a_step_on_its_floor_gets_gradient_and_grows_back(name):
    """A step the projection put exactly on its floor learns again (a straight-through floor,
    not clamp_min, whose gradient is 0 at the bound). DoReFa has no learned step."""
    from bqat.quant import keep_scales_positive

    q = _act_quantizer(name)
    (scale,) = q.scales()
    opt = torch.optim.SGD([scale], lr=0.01)
    keep_scales_positive(opt, q)
    scale.grad = torch.full_like(scale, 1e10)
    opt.step()  # driven far below zero, projected exactly onto the floor
    assert float(scale.detach()) == pytest.approx(q.floor, rel=1e-6)
    x = torch.rand(64, 8)
    for _ in range(3):  # a reconstruction loss: a step of floor clips every x, it wants a larger one
        opt.zero_grad()
        ((q(x) - x) ** 2).mean().backward()
        assert float(scale.grad) < 0
        opt.step()
    assert float(scale.detach()) > 2 * q.floor


@pytest.mark.parametrize("name", ["lsq", "ewgs", "lsqplus"])
def test_the_forward_reads_a_step_below_the_floor_as_the_floor(name):
    q = _act_quantizer(name)
    x = torch.rand(64, 8)
    q.step.data.fill_(q.floor)
    at_floor = q(x)
    q.step.data.fill_(-3.0)  # e.g. set by hand or loaded: the forward never divides by s <= 0
    assert torch.equal(q(x), at_floor)


def test_the_floor_travels_in_the_state_dict_and_old_checkpoints_load():
    from bqat.quant.base import LEGACY_FLOOR

    q = _act_quantizer("lsq")
    fresh = LSQ(2, "act")
    fresh.load_state_dict(q.state_dict())
    assert fresh.floor == q.floor
    old = q.state_dict()
    old["_extra_state"] = {k: v for k, v in old["_extra_state"].items() if k != "floor"}  # before floors existed
    fresh.load_state_dict(old)
    assert fresh.floor == LEGACY_FLOOR and fresh.initialized
