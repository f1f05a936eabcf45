"""timm families beyond ResNet: split (exact composition), twin, one block-replacement step.

Each model is the smallest variant of its family on 32x32 inputs, batch 4, 10 classes.
"""

import copy
import json
import logging

import pytest
import torch
from omegaconf import OmegaConf
from timm.layers import Conv2dSame, StdConv2d
from timm.layers import Linear as TimmLinear
from torch import nn

from bqat.errors import UserError
from bqat.models import build_model, check_split, model_boundaries
from bqat.models.split import chain, resolve, split_blocks
from bqat.quant import QConv2d, QLinear, make_twin
from bqat.quant.modules import QConv2dSame
from bqat.quant.twin import float_layers, is_depthwise
from bqat.replace import BlockReplacement
from conftest import ROOT, run_cli

SIZE = (3, 32, 32)
QUANT = OmegaConf.create({"name": "lsq", "per_channel": False})
BITS = OmegaConf.create({"w": 2, "a": 2, "first_last": 8})

# (timm name, kwargs, family): one per family, the smallest variant.
FAMILIES = [
    ("resnet10t", {}, "ResNet"),
    ("mobilenetv2_035", {}, "MobileNetV2"),
    ("tf_mobilenetv3_small_minimal_100", {}, "MobileNetV3 (Conv2dSame, timm Linear)"),
    ("tinynet_e", {}, "EfficientNet"),
    ("regnetx_002", {}, "RegNet (grouped convs)"),
    ("repvgg_a0", {}, "RepVGG (ByobNet, multi-branch)"),
    ("densenet121", {"growth_rate": 8, "block_config": [1, 1, 1, 1]}, "DenseNet"),
    ("convnext_atto", {}, "ConvNeXt"),
    ("ghostnet_050", {}, "GhostNet"),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4}, "ViT (stretch)"),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: the time goes to op dispatch, and a second intra-op thread only adds
    spin-waiting on a busy machine. Restored for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name, kwargs):
    torch.manual_seed(0)
    cfg = OmegaConf.create({"name": name, "blocks": None, "kwargs": kwargs})
    return build_model(cfg, num_classes=10), cfg


def block_params(model, block):
    modules = [resolve(model, n) for n in block.names]
    return [p for m in modules if isinstance(m, nn.Module) for p in m.parameters()]


@pytest.mark.parametrize("name,kwargs,family", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_splits_exactly_and_trains_one_block_replacement_step(name, kwargs, family):
    fp, cfg = build(name, kwargs)
    boundaries = model_boundaries(fp, cfg, SIZE)
    assert len(boundaries) == 4, boundaries  # stem + stage at stride 4 | 8 | 16 | 32 + head
    check_split(fp, boundaries, SIZE)  # raises unless chaining the blocks equals fp(x) exactly
    assert fp.training  # split and check leave the model's mode as it was

    twin = make_twin(fp, QUANT, BITS)
    assert float_layers(twin) == []  # every conv (depthwise, grouped) and linear is quantized
    qlayers = [m for m in twin.modules() if isinstance(m, (QConv2d, QLinear))]
    assert qlayers and all(m.weight_quantizer.per_channel == is_depthwise(m) for m in qlayers)

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, *SIZE, generator=g), torch.randint(0, 10, (4,), generator=g)
    twin(x)  # initialise the step sizes
    loss_cfg = OmegaConf.create({"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 1.0, "T": 2.0, "w_mp_kd": 0.0})
    hybrid = BlockReplacement(twin, fp, boundaries, OmegaConf.create({"name": "prefix"}), loss_cfg).train()
    before = copy.deepcopy(hybrid.partner.state_dict())

    loss, logs = hybrid.training_step(x, y)
    assert torch.isfinite(loss) and len([k for k in logs if k.startswith("ce/q")]) == 3  # 3 mixed paths
    loss.backward()

    for k, block in enumerate(hybrid.lp_blocks):
        params = block_params(twin, block)
        assert params and all(p.grad is not None for p in params), f"LP block {k + 1} of {family}"
        assert sum(p.grad.abs().sum() for p in params) > 0, f"LP block {k + 1} of {family}"
    assert not hybrid.partner.training
    assert all(p.grad is None and not p.requires_grad for p in hybrid.partner.parameters())
    after = hybrid.partner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics included


def test_conv2d_same_keeps_its_padding_in_the_twin():
    conv = Conv2dSame(4, 6, 3, stride=2)
    q = QConv2dSame.from_float(copy.deepcopy(conv), None, None)
    x = torch.randn(2, 4, 9, 9)  # odd size: TF 'SAME' pads asymmetrically
    assert torch.equal(q(x), conv(x))
    twin = make_twin(nn.Sequential(conv, nn.Flatten(), TimmLinear(6 * 5 * 5, 3)), QUANT, BITS)
    assert type(twin[0]) is QConv2dSame and type(twin[2]) is QLinear
    assert twin(x).shape == (2, 3)


def test_std_conv_stays_float_and_is_logged(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), StdConv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    with caplog.at_level(logging.WARNING, logger="bqat"):
        twin = make_twin(model, QUANT, BITS)
    assert type(twin[1]) is StdConv2d  # its weight standardisation is not dropped
    assert "1 layers stay float" in caplog.text and "StdConv2d" in caplog.text


def test_model_blocks_override_takes_dotted_names(compose_cfg):
    cfg = compose_cfg("model=timm", "model.name=mobilenetv2_035",
                      "model.blocks=[[conv_stem,bn1,blocks.0,blocks.1,blocks.2],[blocks.3,blocks.4,blocks.5,blocks.6,conv_head,bn2]]")
    fp = build_model(cfg.model, num_classes=10)
    boundaries = model_boundaries(fp, cfg.model, SIZE)
    assert boundaries[1][:2] == ["blocks.3", "blocks.4"]
    check_split(fp, boundaries, SIZE)
    skipping = [b for b in boundaries]
    skipping[1] = [n for n in boundaries[1] if n != "blocks.5"]
    with pytest.raises(UserError, match="model.blocks"):
        check_split(fp, skipping, SIZE)


def test_model_without_feature_info_asks_for_model_blocks():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    with pytest.raises(UserError, match="model.blocks"):
        model_boundaries(Plain(), OmegaConf.create({"blocks": None}), SIZE)


def test_model_shortcuts_name_their_timm_models(compose_cfg):
    for option, name in (("mobilenetv2", "mobilenetv2_100"), ("resnet34", "resnet34"), ("resnet50", "resnet50")):
        assert compose_cfg(f"model={option}").model.name == name


def test_cli_trains_a_mobilenetv3_twin(tmp_path):
    run_dir = tmp_path / "run"
    args = ["model=timm", "model.name=mobilenetv3_small_050", "trainer.epochs=1", "partner.epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "data.batch_size=16", "trainer.progress=false",
            f"hydra.run.dir={run_dir}", f"partner.cache_dir={tmp_path / 'partners'}"]
    proc = run_cli(args, cwd=ROOT, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "mobilenetv3_small_050" and metrics["epoch"] == 1
    assert len(metrics["mixed_top1"]) == 3  # 4 blocks -> 3 mixed paths
    twin = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["twin"]
    assert twin["blocks.0.0.conv_dw.weight_quantizer.step"].shape == (16,)  # depthwise: per-channel
    assert "classifier.weight_quantizer.step" in twin  # timm's Linear subclass is quantized too


def test_depthwise_twin_takes_w2a2_block_replacement_steps_with_the_stability_recipe():
    """mobilenetv2_035 at W2A2 with the default recipe (twin.bn_eps, trainer.clip_grad,
    bits.depthwise, positive step sizes): a few SGD steps stay finite, every step size
    stays positive and depthwise convs run at 8 bits."""
    from bqat.engine import clip_gradients
    from bqat.quant import Quantizer, keep_scales_positive, set_bn_eps

    fp, cfg = build("mobilenetv2_035", {})
    boundaries = model_boundaries(fp, cfg, SIZE)
    twin = make_twin(fp, QUANT, OmegaConf.create({"w": 2, "a": 2, "first_last": 8, "depthwise": 8}))
    assert set_bn_eps(twin, 1e-3) > 0 and all(m.eps == 1e-3 for m in twin.modules() if isinstance(m, nn.BatchNorm2d))
    assert fp.bn1.eps == 1e-5  # the partner keeps its own
    dw = [m for m in twin.modules() if isinstance(m, QConv2d) and is_depthwise(m)]
    assert dw and all(m.weight_quantizer.bits == 8 and m.input_quantizer.bits == 8 for m in dw)
    assert any(m.weight_quantizer.bits == 2 for m in twin.modules() if isinstance(m, QConv2d) and not is_depthwise(m))

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, *SIZE, generator=g), torch.randint(0, 10, (8,), generator=g)
    twin(x)
    loss_cfg = OmegaConf.create({"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0, "w_mp_kd": 0.0})
    hybrid = BlockReplacement(twin, fp, boundaries, OmegaConf.create({"name": "prefix"}), loss_cfg).train()
    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    keep_scales_positive(opt, twin)
    for _ in range(4):
        loss, _ = hybrid.training_step(x, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        clip_gradients(opt, 5.0)
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in twin.parameters() if p.grad is not None]))
        assert total <= 5.0 * (1 + 1e-4)
        opt.step()
    scales = [p for m in twin.modules() if isinstance(m, Quantizer) for p in m.scales()]
    assert scales and all(bool((p > 0).all()) for p in scales)
