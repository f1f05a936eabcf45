"""FP partner sources: weight files of several kinds, timm's hub offline, the cache under concurrent runs."""

import json
import subprocess
import sys
import time

import pytest
import timm
import torch
import torchvision
from filelock import FileLock

from bqat.errors import UserError
from bqat.partner import cache_key, get_partner, load_state_dict_into, read_weights
from conftest import ROOT, run_cli
from fake_data import cifar_images, write_cifar10_python


def test_torchvision_weights_load_into_timm_resnet18(tmp_path):
    """A torchvision ResNet-18 weights file, plain or as other tools save it, fills timm's resnet18."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    state = tv.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "references.pth")  # DDP, references
    save_file(state, str(tmp_path / "weights.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    for name in ("plain.pth", "references.pth", "weights.safetensors"):
        model = timm.create_model("resnet18", num_classes=10).eval()
        load_state_dict_into(model, read_weights(tmp_path / name), name)
        with torch.no_grad():
            torch.testing.assert_close(model(x), tv(x), rtol=0, atol=1e-5)


def test_weights_that_do_not_fit_are_named(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(timm.create_model("resnet20", num_classes=10).state_dict(), path)
    with pytest.raises(UserError, match=r"does not fit model .*missing: layer1\.3\.bn1\.bias"):
        load_state_dict_into(timm.create_model("resnet32", num_classes=10), read_weights(path), str(path))
    head = tmp_path / "r20c100.pt"
    torch.save(timm.create_model("resnet20", num_classes=100).state_dict(), head)
    with pytest.raises(UserError, match=r"shape mismatch: fc\.bias, fc\.weight"):
        load_state_dict_into(timm.create_model("resnet20", num_classes=10), read_weights(head), str(head))
    twin = tmp_path / "last.pt"
    torch.save({"twin": {}, "epoch": 1}, twin)
    with pytest.raises(UserError, match="twin checkpoint .* not FP weights"):
        read_weights(twin)


def test_partner_checkpoint_and_zero_epoch_partner_are_evaluated(compose_cfg, tmp_path):
    from bqat.data import build_data

    cfg = compose_cfg("trainer.limit_val_batches=2", f"partner.cache_dir={tmp_path}", "partner.epochs=0")
    data = build_data(cfg.data, seed=0)
    model, top1, source = get_partner(timm.create_model("resnet20", num_classes=10), data, cfg, torch.device("cpu"))
    assert source.startswith(str(tmp_path)) and 0 <= top1 <= 100  # evaluated, not NaN
    saved = torch.load(source, weights_only=True)
    torch.save(saved["state_dict"], tmp_path / "fp.pt")
    cfg.partner.checkpoint = str(tmp_path / "fp.pt")
    again, top1_again, source_again = get_partner(timm.create_model("resnet20", num_classes=10), data, cfg, torch.device("cpu"))
    assert source_again == str(tmp_path / "fp.pt") and top1_again == top1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_pretrained_without_hub_is_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    proc = run_cli(["model=resnet18", "model.pretrained=true", f"hydra.run.dir={tmp_path / 'run'}",
                    f"partner.cache_dir={tmp_path / 'partners'}"], cwd=ROOT, env_extra=env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("bqat-train: error: model.pretrained=true: cannot load timm's weights for resnet18")
    assert "partner.checkpoint=" in lines[0]


def test_parallel_runs_train_one_partner(tmp_path, compose_cfg):
    """Two runs started together on one cache: one trains the partner, the other waits and reuses it."""
    train, test = cifar_images(4, seed=0), cifar_images(2, seed=1)
    write_cifar10_python(tmp_path / "cifar", train, test)
    partners = tmp_path / "partners"
    args = ["data=cifar10", f"data.root={tmp_path / 'cifar'}", "data.batch_size=8", "partner.epochs=1", "trainer.epochs=1",
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.progress=false", f"partner.cache_dir={partners}"]
    lock = FileLock(str(partners / f"{cache_key(compose_cfg(*args))}.pt.lock"))
    partners.mkdir()
    runs = [tmp_path / f"run{i}" for i in (0, 1)]
    with lock:  # hold the lock until both runs are waiting on it: they then race for it
        procs = [subprocess.Popen([sys.executable, "-m", "bqat.train", *args, f"hydra.run.dir={run}"], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for run in runs]
        deadline = time.monotonic() + 300
        while not all((run / "train.log").is_file() and "partner: waiting" in (run / "train.log").read_text() for run in runs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "runs did not reach the partner lock"
            time.sleep(0.5)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    logs = [(run / "train.log").read_text() for run in runs]
    assert sum(log.count("partner: training") for log in logs) == 1
    assert sum(log.count("partner: reusing") for log in logs) == 1
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
    assert metrics[0]["partner_top1"] == metrics[1]["partner_top1"]
    assert metrics[0]["partner_source"] == metrics[1]["partner_source"]
    assert len(list(partners.glob("*.pt"))) == 1
