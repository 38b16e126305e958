"""Optimizers (SGD with momentum/Nesterov, Adam; PyTorch's update rules, L2 weight decay
added to the gradient) updating arrays in place, and the per-epoch learning-rate schedule."""

from __future__ import annotations

import math

from .config import TrainConfig


class SGD:
    slots = ("momentum",)

    def __init__(self, xp, params: list, cfg: TrainConfig):
        self.mu, self.nesterov, self.wd = cfg.momentum, cfg.nesterov, cfg.weight_decay
        self.state = {"momentum": [xp.zeros_like(p) for p in params]}
        self.steps = 0

    def step(self, params: list, grads: list, lr: float) -> None:
        for p, g, buf in zip(params, grads, self.state["momentum"]):
            if self.wd:
                g += self.wd * p
            if self.mu:
                buf *= self.mu
                buf += g
                if self.nesterov:
                    g += self.mu * buf
                else:
                    g = buf
            p -= lr * g
        self.steps += 1


class Adam:
    slots = ("m", "v")

    def __init__(self, xp, params: list, cfg: TrainConfig):
        self.xp = xp
        (self.b1, self.b2), self.wd, self.eps = cfg.betas, cfg.weight_decay, 1e-8
        self.state = {"m": [xp.zeros_like(p) for p in params], "v": [xp.zeros_like(p) for p in params]}
        self.steps = 0

    def step(self, params: list, grads: list, lr: float) -> None:
        self.steps += 1
        c1 = 1.0 - self.b1**self.steps
        c2 = 1.0 - self.b2**self.steps
        for p, g, m, v in zip(params, grads, self.state["m"], self.state["v"]):
            if self.wd:
                g += self.wd * p
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * (g * g)
            p -= (lr / c1) * m / (self.xp.sqrt(v / c2) + self.eps)


def make(xp, params: list, cfg: TrainConfig):
    return {"sgd": SGD, "adam": Adam}[cfg.optimizer](xp, params, cfg)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch `epoch` (0-based): linear warm-up, then the schedule."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    e, span = epoch - cfg.warmup_epochs, cfg.epochs - cfg.warmup_epochs
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * e / span)) * cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** (e // cfg.step_size)
    return cfg.lr
