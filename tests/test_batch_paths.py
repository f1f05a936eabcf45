"""schedule.batch_paths: the paths entering a partner block go through it as one batch.

The partner is in eval mode, so the batched step equals the unbatched one (losses, logs and
twin gradients) to float rounding, and a prefix step makes n-1 partner-block calls."""

import copy

import pytest
import torch

from test_objective import batch, tiny

KD = {"w_kd": 0.5, "w_mp_kd": 0.7, "T": 2.0, "path_weights": "geometric"}


def step(hybrid, x, y):
    hybrid.twin.zero_grad(set_to_none=True)
    loss, logs = hybrid.training_step(x, y)
    loss.backward()
    return loss.detach(), logs, [p.grad.clone() for p in hybrid.twin.parameters()]


@pytest.mark.parametrize("schedule", ["prefix", "single"])
@pytest.mark.parametrize("loss", [{}, KD], ids=["ce", "kd"])
def test_batched_step_equals_unbatched(schedule, loss):
    batched = tiny(schedule, **loss)
    unbatched = copy.deepcopy(batched)
    unbatched.batch_paths = False
    joined = copy.deepcopy(batched)
    joined.batch_fp_path = True  # the partner-only path joins the trainable batches (CUDA's choice)
    x, y = batch()
    ref_loss, ref_logs, ref_grads = step(unbatched, x, y)
    for hybrid in (batched, joined):
        got_loss, got_logs, got_grads = step(hybrid, x, y)
        assert torch.allclose(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert set(got_logs) == set(ref_logs)
        for key, value in ref_logs.items():
            assert float(got_logs[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
        for (name, _), g, r in zip(hybrid.twin.named_parameters(), got_grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-6), name
    n = batched.n
    if schedule == "prefix":
        assert unbatched.partner_block_calls == n * (n - 1) // 2 + (n if loss else 0)
        assert batched.partner_block_calls == n - 1 + (n if loss else 0)  # z_0 apart, without a backward
        assert joined.partner_block_calls == (n if loss else n - 1)
    else:  # single, n = 3: F_1 (x), F_2 (F_1 x) feed the lone twin blocks; F_2 and F_3 carry the paths
        assert batched.partner_block_calls == 4 + (1 if loss else 0)
        assert joined.partner_block_calls == 3


def test_batch_paths_setting():
    from omegaconf import OmegaConf

    from bqat.errors import UserError
    from bqat.replace import batch_paths_setting

    assert batch_paths_setting(None) is True and batch_paths_setting(OmegaConf.create({"name": "prefix"})) is True
    assert tiny({"name": "prefix", "batch_paths": False}).batch_paths is False
    with pytest.raises(UserError, match="schedule.batch_paths must be true or false"):
        batch_paths_setting({"batch_paths": "sometimes"})
