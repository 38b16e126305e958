"""The PyTorch peer of `scoretrain bench --net resnet20`: the same training step, written as the
edge-popup reference code writes it (allenai/hidden-networks: a conv whose forward masks its
weights by a GetSubnet of |scores| with a straight-through backward, non-affine BatchNorm), on the
same net (configs/mnist_resnet20.yaml: resnet20 x0.5, k = 0.5, SGD lr 0.1, momentum 0.9, weight
decay 5e-4, batch 128 of MNIST), timed as bench times it: 3 warm-up steps, then the best of 5
rounds of 10 steps. A benchmark, not a test: PyTorch is not one of scoretrain's dependencies.

    .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    .venv/bin/python tools/torch_peer.py                  # kthvalue threshold (the faster peer)
    .venv/bin/python tools/torch_peer.py --subnet sort    # hidden-networks' own sort-based GetSubnet

Run it and `scoretrain bench --net resnet20 --device cpu` one after the other, never at once.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from scoretrain.data import datasets as data


class GetSubnet(torch.autograd.Function):
    """hidden-networks' mask: 1 for the top-k fraction of |scores| (by sorting them), the gradient
    passed straight through to the scores."""

    @staticmethod
    def forward(ctx, scores, k):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        flat = out.flatten()
        flat[idx[:j]] = 0
        flat[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


class KthSubnet(torch.autograd.Function):
    """The same mask from a kthvalue threshold (no sort)."""

    @staticmethod
    def forward(ctx, scores, k):
        j = int((1 - k) * scores.numel())
        threshold = scores.flatten().kthvalue(max(j, 1)).values
        return (scores > threshold).to(scores.dtype) if j else torch.ones_like(scores)

    @staticmethod
    def backward(ctx, g):
        return g, None


class Subnet:
    """The weights are frozen random signed constants; only the scores learn."""

    def init_subnet(self, k, subnet):
        self.k, self.subnet = k, subnet
        self.scores = nn.Parameter(torch.empty_like(self.weight))
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))
        fan_in = nn.init._calculate_correct_fan(self.weight, "fan_in")
        self.weight.data = self.weight.data.sign() * math.sqrt(2 / fan_in)
        self.weight.requires_grad = False

    def masked(self):
        return self.weight * self.subnet.apply(self.scores.abs(), self.k)


class SubnetConv(nn.Conv2d, Subnet):
    def forward(self, x):
        return F.conv2d(x, self.masked(), None, self.stride, self.padding)


class SubnetLinear(nn.Linear, Subnet):
    def forward(self, x):
        return F.linear(x, self.masked())


def conv(c_in, c_out, k, stride, args):
    layer = SubnetConv(c_in, c_out, k, stride, padding=k // 2, bias=False)
    layer.init_subnet(args.k, args.subnet_fn)
    return layer


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride, args):
        super().__init__()
        self.conv1, self.bn1 = conv(c_in, c_out, 3, stride, args), nn.BatchNorm2d(c_out, affine=False)
        self.conv2, self.bn2 = conv(c_out, c_out, 3, 1, args), nn.BatchNorm2d(c_out, affine=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride, args), nn.BatchNorm2d(c_out, affine=False))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, args, width=0.5):
        super().__init__()
        widths = [max(1, round(16 * width)), max(1, round(32 * width)), max(1, round(64 * width))]
        self.stem, self.bn = conv(1, widths[0], 3, 1, args), nn.BatchNorm2d(widths[0], affine=False)
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(3):
                blocks.append(Block(c, w, 2 if i > 0 and j == 0 else 1, args))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = SubnetLinear(c, 10, bias=False)
        self.fc.init_subnet(args.k, args.subnet_fn)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subnet", choices=["kthvalue", "sort"], default="kthvalue")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    args.subnet_fn = KthSubnet if args.subnet == "kthvalue" else GetSubnet
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = data.load("mnist", str(Path(__file__).resolve().parents[1] / "data"))
    mean, std = data.standardization(ds.x_train)
    x = torch.from_numpy(np.ascontiguousarray(data.to_float(ds.x_train, mean, std).transpose(0, 3, 1, 2)))
    y = torch.from_numpy(ds.y_train.astype(np.int64))
    net = ResNet20(args).train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    batches = [perm[(i * args.batch) % (len(y) - args.batch + 1):][: args.batch] for i in range(10)]

    def step(idx):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()

    for idx in batches[:3]:
        step(idx)
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for idx in batches:
            step(idx)
        rounds.append((time.perf_counter() - t0) / len(batches))
    best = min(rounds)
    print(f"torch {torch.__version__} peer ({args.subnet} subnet, {args.threads} threads): resnet20 x0.5, batch {args.batch}: "
          f"{best:.4f} s/step (best of 5 rounds of 10; rounds {', '.join(f'{r:.4f}' for r in rounds)}), "
          f"{best * math.ceil(60000 / args.batch):.1f} s/epoch")


if __name__ == "__main__":
    main()
