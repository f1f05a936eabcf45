"""Block replacement in a LightningModule: its `training_step` calls the wrapper's. The network is
torchvision's ResNet-18, which flattens in its `forward`, so a callable cuts it into blocks; the
twin is bqat's (W4A4 here).

    python examples/lightning_module.py             # digits, CPU, under a minute (pip install bqat[lightning])
    python examples/lightning_module.py --batches 2 --batch-size 16   # a smoke run (what the tests do)
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bqat import BlockReplacement, make_twin


def resnet_blocks(m: torchvision.models.ResNet) -> list:
    """stem + layer1 | layer2 | layer3 | layer4 + head, with the flatten torchvision does in code."""
    return [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1), m.layer2, m.layer3,
            nn.Sequential(m.layer4, m.avgpool, nn.Flatten(1), m.fc)]


class BlockReplacementModule(L.LightningModule):
    """The twin of a frozen FP `partner`, trained with block replacement."""

    def __init__(self, partner: nn.Module, bits: int = 4, lr: float = 0.01):
        super().__init__()
        self.lr = lr
        self.br = BlockReplacement(make_twin(partner, quant="lsq", bits=bits), partner, blocks=resnet_blocks,
                                   loss={"w_kd": 1.0}, example_input=(3, 16, 16))

    def training_step(self, batch, batch_idx):
        loss, logs = self.br.training_step(*batch)
        self.log_dict({f"train/{k}": float(v) for k, v in logs.items()})
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        for name, logits in self.br.evaluate(x).items():  # the twin ('lp') and each mixed path
            self.log(f"val/top1_{name}", 100.0 * (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.br.parameters(), lr=self.lr, momentum=0.9)  # the twin's parameters only


def digits(size: int = 16):
    """(train, val) TensorDatasets of scikit-learn's 8x8 digits, upsampled, 3 channels."""
    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=size, mode="bilinear").expand(-1, 3, -1, -1)
    x, y = (x - x.mean()) / x.std(), torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return TensorDataset(x[perm[:1500]], y[perm[:1500]]), TensorDataset(x[perm[1500:]], y[perm[1500:]])


def train_partner(data: TensorDataset, epochs: int, batches: int | None, batch_size: int) -> nn.Module:
    """The FP network, trained as usual (a plain loop here; any trainer will do)."""
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for i, (x, y) in enumerate(DataLoader(data, batch_size=batch_size, shuffle=True)):
            if batches is not None and i >= batches:
                break
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def main(argv=None) -> dict:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--epochs", type=int, default=2)
    args.add_argument("--batches", type=int, default=None, help="at most this many batches per epoch")
    args.add_argument("--batch-size", type=int, default=64)
    args = args.parse_args(argv)
    L.seed_everything(0, verbose=False)
    train, val = digits()
    module = BlockReplacementModule(train_partner(train, args.epochs, args.batches, args.batch_size))
    trainer = L.Trainer(max_epochs=args.epochs, limit_train_batches=args.batches or 1.0, limit_val_batches=args.batches or 1.0,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(train, batch_size=args.batch_size, shuffle=True), DataLoader(val, batch_size=args.batch_size))
    result = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print("  ".join(f"{k} {v:.2f}" for k, v in sorted(result.items()) if k.startswith("val/")))
    return result


if __name__ == "__main__":
    main()
