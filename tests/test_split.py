"""Block splitting composes back to the unsplit model exactly."""

import pytest
import timm
import torch

import bqat.models  # noqa: F401
from bqat.errors import UserError
from bqat.models import check_split, default_boundaries, split_blocks
from bqat.models.split import chain


def test_cifar_resnets_are_in_timms_registry():
    for name, depth in (("resnet20", 20), ("resnet32", 32), ("resnet56", 56)):
        m = timm.create_model(name, num_classes=10)
        convs = sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())
        assert convs + 1 == depth  # depth counts convs plus the classifier
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # Option-A shortcuts are parameter-free: ResNet-20 has 0.27M parameters (He et al. 2016, Table 6).
    assert sum(p.numel() for p in timm.create_model("resnet20").parameters()) == pytest.approx(0.27e6, rel=0.01)


@pytest.mark.parametrize("name,n_blocks,size", [("resnet20", 3, 32), ("resnet56", 3, 32), ("resnet18", 4, 32), ("resnet50", 4, 64)])
def test_split_composes_exactly(name, n_blocks, size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    boundaries = default_boundaries(model)
    assert len(boundaries) == n_blocks
    check_split(model, boundaries, (3, size, size))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(chain(split_blocks(model, boundaries), x), model(x))


def test_resnet18_blocks_follow_design():
    boundaries = default_boundaries(timm.create_model("resnet18"))
    assert boundaries == [["conv1", "bn1", "act1", "maxpool", "layer1"], ["layer2"], ["layer3"], ["layer4"]]


def test_a_split_that_skips_a_stage_is_rejected_naming_model_blocks():
    model = timm.create_model("resnet20")
    with pytest.raises(UserError, match="model.blocks"):
        check_split(model, [["conv1", "bn1", "act1", "layer1"], ["layer3"]], (3, 32, 32))
