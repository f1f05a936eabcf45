"""LSQ (Esser et al., ICLR 2020) against its equations, on hand-made tensors."""

import math

import pytest
import torch

from bqat.quant import get_quantizer

LSQ = get_quantizer("lsq")


def make(bits, kind, step, per_channel=False, channels=1, signed=None):
    q = LSQ(bits, kind, per_channel=per_channel, channels=channels)
    q.step.data = torch.as_tensor(step, dtype=torch.float32).reshape(q.step.shape)
    q.initialized = True
    if signed is not None:
        q.signed = signed
    return q


def test_grid_bounds():
    assert (make(2, "weight", 1.0).qn, make(2, "weight", 1.0).qp) == (-2, 1)
    assert (make(2, "act", 1.0, signed=False).qn, make(2, "act", 1.0, signed=False).qp) == (0, 3)
    assert (make(4, "act", 1.0, signed=True).qn, make(4, "act", 1.0, signed=True).qp) == (-8, 7)


def test_forward_equals_reference_formula():
    """Eq. 1-2: x_hat = s * clamp(round(v/s), Qn, Qp)."""
    v = torch.tensor([-3.0, -1.2, -0.49, 0.0, 0.26, 0.74, 1.3, 2.9, 10.0])
    s = 0.5
    q = make(3, "weight", s)
    expected = s * torch.clamp(torch.round(v / s), -4, 3)
    assert torch.equal(q(v), expected)


def test_step_gradient_matches_paper():
    """Eq. 3 times g = 1/sqrt(N*Qp) (sec. 2.2): d x_hat/ds = -v/s + round(v/s) inside, Qn/Qp outside."""
    v = torch.tensor([-3.0, -1.2, -0.49, 0.1, 0.26, 0.74, 1.3, 2.9])
    s, qn, qp = 0.5, -4, 3
    q = make(3, "weight", s)
    q(v).sum().backward()
    r = v / s
    per_elem = torch.where(r <= qn, torch.tensor(float(qn)), torch.where(r >= qp, torch.tensor(float(qp)), -r + torch.round(r)))
    g = 1 / math.sqrt(v.numel() * qp)
    assert q.step.grad.item() == pytest.approx(per_elem.sum().item() * g, rel=1e-6, abs=1e-7)


def test_input_gradient_is_straight_through_strictly_inside_the_range():
    """Eq. 5: d x_hat/dv = 1 if Qn < v/s < Qp, else 0 (the bounds themselves included in 'else')."""
    v = torch.tensor([-3.0, -2.0, -1.0, 0.2, 0.9, 1.0, 1.6], requires_grad=True)
    q = make(2, "weight", 1.0)  # grid [-2, 1]
    q(v).sum().backward()
    assert v.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_matches_torch_fused_learnable_fake_quant():
    """Where they coincide (zero point 0, grad_factor = g) LSQ equals torch's fused op, values and gradients."""
    torch.manual_seed(0)
    # torch masks the input gradient by the *rounded* code, LSQ by the clamped one: they
    # differ only for v/s in (Qp, Qp + 0.5), which this input avoids.
    r = torch.rand(4, 8, 5, 5) * 5
    r = torch.where((r > 3) & (r < 3.5), r + 0.5, r)
    x = r * 0.3
    q = make(2, "act", 0.3, signed=False)
    x1 = x.clone().requires_grad_(True)
    y1 = q(x1)
    dy = torch.randn_like(y1)
    (y1 * dy).sum().backward()

    x2 = x.clone().requires_grad_(True)
    scale = torch.tensor([0.3], requires_grad=True)
    zp = torch.tensor([0.0])
    g = 1 / math.sqrt(x[0].numel() * 3)
    y2 = torch._fake_quantize_learnable_per_tensor_affine(x2, scale, zp, 0, 3, g)
    (y2 * dy).sum().backward()
    assert torch.allclose(y1, y2, atol=1e-6)
    assert torch.allclose(x1.grad, x2.grad)
    assert q.step.grad.item() == pytest.approx(scale.grad.item(), rel=1e-4)


def test_initialisation_per_tensor_and_per_channel():
    """Sec. 2.1: s = 2 * mean(|v|) / sqrt(Qp)."""
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -0.5, 0.5]])
    q = LSQ(4, "weight")
    q(w)
    assert q.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(7))
    qc = LSQ(4, "weight", per_channel=True, channels=2)
    qc(w)
    assert qc.step.tolist() == pytest.approx([2 * 2.5 / math.sqrt(7), 2 * 0.5 / math.sqrt(7)])


def test_activation_signedness_is_decided_from_the_first_batch():
    pos, mixed = LSQ(2, "act"), LSQ(2, "act")
    pos(torch.rand(3, 4))
    mixed(torch.randn(3, 4))
    assert (pos.signed, pos.qn, pos.qp) == (False, 0, 3)
    assert (mixed.signed, mixed.qn, mixed.qp) == (True, -2, 1)


def test_state_survives_state_dict_round_trip():
    q = LSQ(3, "act")
    q(torch.randn(2, 5))
    r = LSQ(3, "act")
    r.load_state_dict(q.state_dict())
    assert (r.initialized, r.signed) == (True, q.signed)
    assert torch.equal(r.step, q.step)
