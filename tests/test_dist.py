"""Data-parallel training on CPU (gloo): N ranks train like one process with an N times
larger batch; rank 0 alone writes; quantizer initialisation agrees across ranks."""

import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from conftest import ROOT, run_cli

TINY = ["trainer.epochs=1", "partner.epochs=0", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.progress=false", "trainer.device=cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)


def _hybrid(quant):
    """resnet20 partner with non-trivial BN statistics, its W2A2 twin (quant), schedule prefix."""
    import timm

    import bqat.models  # noqa: F401
    from bqat.models import default_boundaries
    from bqat.quant import make_twin
    from bqat.replace import BlockReplacement

    torch.manual_seed(0)
    fp = timm.create_model("resnet20", num_classes=10)
    with torch.no_grad():
        fp.train()(torch.randn(16, 3, 16, 16))
    fp.eval()
    twin = make_twin(fp, OmegaConf.create({"name": quant, "per_channel": False}), OmegaConf.create({"w": 2, "a": 2, "first_last": 8}))
    loss_cfg = OmegaConf.create({"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0, "w_mp_kd": 0.0})
    return BlockReplacement(twin, fp, default_boundaries(fp), OmegaConf.create({"name": "prefix"}), loss_cfg).train()


def _step(hybrid, x, y, wrap=lambda h: h):
    """Initialise the quantizers on x (as bqat.train does), then one step with backward."""
    with torch.no_grad():
        hybrid.twin.train()(x)
    task = wrap(hybrid)  # held until backward: DDP's gradient hooks live as long as it does
    loss, _ = task.training_step(x, y)
    loss.backward()
    return loss.item()


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from bqat import dist

    cpu = torch.device("cpu")
    dist.setup(cpu)
    x, y = (t.tensor_split(2)[rank] for t in _batch())
    result = {}
    for quant in ("lsq", "none"):
        hybrid = _hybrid(quant)
        dist.convert_sync_batchnorm(hybrid.twin, cpu)
        loss = _step(hybrid, x, y, wrap=lambda h: dist.DistributedTask(h, cpu))  # DDP averages the twin's gradients
        result[quant] = {
            "loss": dist.mean_across_ranks({"loss": loss})["loss"],
            "steps": {n: p.detach().clone() for n, p in hybrid.twin.named_parameters() if n.endswith("step")},
            "grads": {n: p.grad.clone() for n, p in hybrid.twin.named_parameters()},
            "signed": [m.signed for m in hybrid.twin.modules() if hasattr(m, "signed")],
        }
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.teardown()


def test_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    """Two ranks with 8 images each vs one process with the 16: the same loss, the same
    initial step sizes on every rank, and (FP twin) the same gradients; this needs the
    synchronised BatchNorm of the twin and the averaged quantizer initialisation."""
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x, y = _batch()
    for quant in ("lsq", "none"):
        r0, r1 = ranks[0][quant], ranks[1][quant]
        assert r0["signed"] == r1["signed"]
        hybrid = _hybrid(quant)
        loss = _step(hybrid, x, y)
        assert r0["loss"] == pytest.approx(loss, rel=1e-5), quant
        for name, p in hybrid.twin.named_parameters():
            assert torch.equal(r0["grads"][name], r1["grads"][name]), name  # DDP: every rank the same
            if name.endswith("step"):
                assert torch.equal(r0["steps"][name], r1["steps"][name]), name
                assert torch.allclose(r0["steps"][name], p.detach(), rtol=1e-5), name
            if quant == "none":
                # LSQ's gradients jump where a float-level difference flips a rounding: compare them on the FP twin.
                assert torch.allclose(r0["grads"][name], p.grad, rtol=1e-3, atol=1e-6), name
    assert ranks[0]["lsq"]["steps"]  # the LSQ twin has step sizes to compare


def test_torchrun_two_ranks_first_loss_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m bqat.train data.batch_size=16` vs one process with
    batch 32: metrics.json says world_size 2 and the first step's loss is the same.

    The first/last layers stay FP here: at 8 bits the first layer quantizes the digits'
    few distinct pixel values, and the averaged initial step (mean of two half-batch
    means) differs from the one-process value in the last float bit, which flips the code
    of many identical pixels at once (about 1e-3 relative in the loss).
    """
    common = [*TINY, "bits.first_last=fp", f"partner.cache_dir={tmp_path / 'partners'}"]
    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bqat.train"]
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([*torchrun, *common, "data.batch_size=16", f"hydra.run.dir={ddp_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = run_cli([*common, "data.batch_size=32", f"hydra.run.dir={one_dir}"], cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]

    ddp, single = (json.loads((d / "metrics.json").read_text()) for d in (ddp_dir, one_dir))
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["first_step_loss"] == pytest.approx(single["first_step_loss"], rel=1e-5)
    # rank 0 alone writes: one Hydra folder, one log, checkpoints
    assert (ddp_dir / ".hydra" / "config.yaml").is_file() and (ddp_dir / "checkpoints" / "last.pt").is_file()
    assert sorted(p.name for p in ddp_dir.iterdir()) == [".hydra", "checkpoints", "metrics.json", "tb", "train.log"]
    assert len(list((ddp_dir / "tb").iterdir())) == 1


def test_loader_shards_global_batches_like_one_process():
    """Rank r of N gets slice r of each global batch (augmentation included) of one process
    with batch_size * N."""
    from bqat.data import TensorLoader, random_crop_flip

    images, labels = torch.randn(50, 3, 8, 8), torch.arange(50)

    def loader(bs, rank=0, ws=1, drop_last=True):
        aug = lambda x, g: random_crop_flip(x, 2, flip=True, generator=g)  # noqa: E731
        loader = TensorLoader(images, labels, bs, shuffle=True, drop_last=drop_last, augment=aug, seed=3)
        loader.shard(rank, ws)
        return loader

    one = list(loader(8))
    shards = [list(loader(4, r, 2)) for r in range(2)]
    assert len(one) == len(shards[0]) == len(shards[1]) == len(loader(4, 1, 2)) == 6
    for b, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([shards[0][b][0], shards[1][b][0]]), x)
        assert torch.equal(torch.cat([shards[0][b][1], shards[1][b][1]]), y)
    # validation (no drop_last): every image exactly once over the ranks
    def val(r):
        loader = TensorLoader(images, labels, 4)
        loader.shard(r, 3)
        return loader

    seen = torch.cat([y for r in range(3) for _, y in val(r)])
    assert sorted(seen.tolist()) == list(range(50))
    assert [len(val(r)) for r in range(3)] == [5, 5, 4]
