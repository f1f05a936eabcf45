"""Block replacement inside a plain PyTorch loop: a timm ResNet-18, bqat's low-bit twin of it,
and the same loop you would write for plain QAT. The lines marked `# bqat` are all the wrapper
costs; everything else is ordinary PyTorch.

    python examples/plain_loop.py            # scikit-learn's digits at 16x16, CPU, under a minute
    python examples/plain_loop.py --batches 2 --batch-size 16   # a smoke run (what the tests do)
"""

import argparse

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from bqat import BlockReplacement, keep_scales_positive, make_twin  # bqat


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
    args.add_argument("--epochs", type=int, default=2)
    args.add_argument("--batches", type=int, default=None, help="at most this many batches per epoch")
    args.add_argument("--batch-size", type=int, default=64)
    args = args.parse_args(argv)
    torch.manual_seed(0)
    train, val = digits(batch_size=args.batch_size)
    train, val = train[: args.batches], val[: args.batches]

    # The FP network, trained as usual: it becomes the frozen partner.
    model = timm.create_model("resnet18", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(args.epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    fp_top1 = top1(model, val)

    # The low-bit twin, trained with block replacement: W2A2, first conv and classifier at 8 bits.
    twin = make_twin(model, quant="lsq", bits=2)  # bqat
    br = BlockReplacement(twin, model, schedule="prefix", loss={"w_kd": 1.0}, example_input=train[0][0])  # bqat
    opt = torch.optim.SGD(br.parameters(), lr=0.01, momentum=0.9)  # bqat: the twin's parameters only
    keep_scales_positive(opt, twin)  # bqat: learned step sizes stay positive
    losses = []
    for _ in range(args.epochs):
        br.train()  # bqat: the twin trains, the partner stays in eval mode
        for x, y in train:
            loss, logs = br.training_step(x, y)  # bqat: instead of F.cross_entropy(twin(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    result = {"fp_top1": fp_top1, "twin_top1": top1(br.twin, val), "losses": losses, "logs": sorted(logs)}
    print(f"FP partner {fp_top1:.1f}%  W2A2 twin {result['twin_top1']:.1f}%  (val top-1; loss {losses[0]:.2f} -> {losses[-1]:.2f})")
    return result


if __name__ == "__main__":
    main()
