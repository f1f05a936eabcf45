"""A Brevitas-quantized twin, wrapped unchanged: Brevitas does the quantization, bqat the block
replacement. The twin is the same network as the FP partner, built from Brevitas' layers
(QuantConv2d, QuantReLU, QuantLinear) and started from the partner's weights; the blocks are
named by module.

    python examples/brevitas_twin.py             # digits, CPU, under a minute (pip install bqat[brevitas])
    python examples/brevitas_twin.py --batches 2 --batch-size 16   # a smoke run (what the tests do)
"""

import argparse
from collections import OrderedDict
from functools import partial

import brevitas.nn as qnn
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from bqat import BlockReplacement


def cnn(conv=nn.Conv2d, act=nn.ReLU, linear=nn.Linear) -> nn.Sequential:
    """stem | stage1 | stage2 | head: the FP partner with torch's layers, the twin with Brevitas'."""
    def stage(cin, cout, stride):
        return nn.Sequential(conv(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), act())

    return nn.Sequential(OrderedDict(stem=stage(3, 32, 1), stage1=stage(32, 64, 2), stage2=stage(64, 128, 2),
                                     head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear(128, 10))))


def digits(size: int = 16, batch_size: int = 64):
    """(train, val) batches of scikit-learn's 8x8 digits, upsampled, 3 channels."""
    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=size, mode="bilinear").expand(-1, 3, -1, -1)
    x, y = (x - x.mean()) / x.std(), torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1500], perm[1500:]
    return list(zip(x[train].split(batch_size), y[train].split(batch_size))), list(zip(x[val].split(batch_size), y[val].split(batch_size)))


def top1(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return 100.0 * correct / sum(len(y) for _, y in batches)


def main(argv=None) -> dict:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--epochs", type=int, default=4)
    args.add_argument("--bits", type=int, default=3)
    args.add_argument("--batches", type=int, default=None, help="at most this many batches per epoch")
    args.add_argument("--batch-size", type=int, default=64)
    args = args.parse_args(argv)
    torch.manual_seed(0)
    train, val = digits(batch_size=args.batch_size)
    train, val = train[: args.batches], val[: args.batches]

    partner = cnn()
    opt = torch.optim.SGD(partner.parameters(), lr=0.05, momentum=0.9)
    for _ in range(args.epochs):
        partner.train()
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(partner(x), y).backward()
            opt.step()
    fp_top1 = top1(partner, val)

    # The Brevitas twin: b-bit weights and activations, the partner's weights to start from.
    b = args.bits
    twin = cnn(conv=partial(qnn.QuantConv2d, weight_bit_width=b), act=partial(qnn.QuantReLU, bit_width=b),
               linear=partial(qnn.QuantLinear, weight_bit_width=8))
    twin.load_state_dict(partner.state_dict(), strict=False)  # Brevitas' quantizer parameters start from their own init
    br = BlockReplacement(twin, partner, blocks=[["stem", "stage1"], ["stage2"], ["head"]], example_input=train[0][0])
    opt = torch.optim.SGD(br.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(args.epochs):
        br.train()
        for x, y in train:
            loss, logs = br.training_step(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    result = {"fp_top1": fp_top1, "twin_top1": top1(br.twin, val), "losses": losses, "logs": sorted(logs)}
    print(f"FP partner {fp_top1:.1f}%  Brevitas W{b}A{b} twin {result['twin_top1']:.1f}%  (val top-1; loss {losses[0]:.2f} -> {losses[-1]:.2f})")
    return result


if __name__ == "__main__":
    main()
