"""trainer.compile / precision / channels_last (bqat.accel) on a tiny CIFAR ResNet.

Compilation uses the aot_eager backend (graph capture and autograd, no code generation)
so the test stays fast; `make bench` measures inductor."""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bqat.accel import Accel, compile_blocks
from bqat.errors import UserError
from bqat.models import default_boundaries
from bqat.models.cifar_resnet import CifarResNet
from bqat.quant import make_twin
from bqat.replace import BlockReplacement, prefix_path


def tiny(schedule="sampled"):
    torch.manual_seed(0)
    fp = CifarResNet(depth=8, width=4)
    with torch.no_grad():
        fp.train()(torch.randn(8, 3, 8, 8))
    fp.eval()
    twin = make_twin(fp, OmegaConf.create({"name": "lsq", "per_channel": False}), OmegaConf.create({"w": 2, "a": 2, "first_last": 8}))
    twin(torch.randn(8, 3, 8, 8))
    loss_cfg = OmegaConf.create({"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0, "w_mp_kd": 0.0})
    return BlockReplacement(twin, fp, default_boundaries(fp), OmegaConf.create({"name": schedule, "pool": "prefix"}), loss_cfg).train()


def data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_compiled_blocks_match_eager_and_do_not_recompile_per_path():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager, compiled = tiny(), tiny()
    compile_blocks(compiled, backend="aot_eager")
    x, y = data()
    n = compiled.n
    for path in [prefix_path(k, n) for k in range(1, n)]:  # every mixed path once: compiles each block
        for hybrid in (eager, compiled):
            hybrid.twin.zero_grad(set_to_none=True)
            z = hybrid.run_paths(x, ["q" * n, path])
            (F.cross_entropy(z["q" * n], y) + F.cross_entropy(z[path], y)).backward()
        assert torch.allclose(compiled.run_paths(x, [path])[path], eager.run_paths(x, [path])[path], atol=1e-5)
        for (name, p), q in zip(eager.twin.named_parameters(), compiled.twin.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2 * n - 1  # n LP blocks + n-1 partner blocks, at least
    drawn = set()
    for _ in range(12):  # sampled schedule: a different path most steps, no new graph
        loss, logs = compiled.training_step(x, y)
        loss.backward()
        drawn |= {k for k in logs if k.startswith("ce/") and k != "ce/lp"}
    assert len(drawn) == n - 1
    assert counters["stats"]["unique_graphs"] == graphs


def test_bf16_autocast_step_on_cpu():
    hybrid = tiny(schedule="prefix")
    reference = copy.deepcopy(hybrid)
    accel = Accel(OmegaConf.create({"precision": "bf16", "channels_last": False}), torch.device("cpu"))
    x, y = data()
    with accel.autocast():
        logits = hybrid.run_paths(x, ["q" * hybrid.n])["q" * hybrid.n]
        loss, _ = hybrid.training_step(x, y)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in hybrid.twin.parameters())
    ref_loss, _ = reference.training_step(x, y)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=0.1)  # same step, bf16 rounding


def test_channels_last_and_bad_precision():
    accel = Accel(OmegaConf.create({"precision": "fp32", "channels_last": True}), torch.device("cpu"))
    x, y = accel.to_device(*data())
    assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.long
    hybrid = accel.prepare(tiny(schedule="prefix"))
    assert hybrid.twin.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    ref = tiny(schedule="prefix")
    loss, _ = hybrid.training_step(x, y)
    assert loss.item() == pytest.approx(ref.training_step(*data())[0].item(), rel=1e-5)
    assert Accel(OmegaConf.create({}), torch.device("cpu")).memory_format == torch.contiguous_format  # auto: CUDA only
    with pytest.raises(UserError, match="trainer.precision"):
        Accel(OmegaConf.create({"precision": "fp16"}), torch.device("cpu"))
