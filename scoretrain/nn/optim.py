"""Optimizers (SGD with momentum/Nesterov, Adam; PyTorch's update rules, L2 weight decay
added to the gradient) updating arrays in place, and the per-epoch learning-rate schedule."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..kernels.backend import fused

if TYPE_CHECKING:  # annotations only: nn/ does not depend on run/
    from ..run.config import TrainConfig


f32 = np.float32  # the fused loops take every scalar as the float32 the array code rounds it to


def flat(a):
    return a.reshape(-1)  # a view: fused() takes contiguous arrays only


class SGD:
    slots = ("momentum",)
    replayable = True  # its one changing scalar, lr, can be a device array (step.CapturedStep)

    def __init__(self, xp, params: list, cfg: TrainConfig):
        self.xp = xp
        self.mu, self.nesterov, self.wd = cfg.momentum, cfg.nesterov, cfg.weight_decay
        self.state = {"momentum": [xp.zeros_like(p) for p in params]}
        self.tmp = [xp.empty_like(p) for p in params]  # scratch, so a step allocates nothing
        self.steps = 0

    def scalars(self, lr) -> tuple:
        """The fused loops' scalars of a step (kernels.sgd), after the state arrays. `lr` is a
        number, or a 0-d float32 device array (a CUDA graph's: step.CapturedStep), passed on."""
        return f32(lr) if isinstance(lr, (int, float, np.generic)) else lr, f32(self.mu), f32(self.wd), self.nesterov

    def step_fused(self, lr: float, loop) -> None:
        """One step done by `loop(rule, state, scalars)`, a fused CPU loop that does more work in
        the same pass (methods.FusedScoreStep); one learned tensor."""
        loop("sgd", (flat(self.state["momentum"][0]),), self.scalars(lr))
        self.steps += 1

    def step(self, params: list, grads: list, lr: float) -> None:
        """params -= the update from grads."""
        mul = self.xp.multiply
        for p, g, buf, tmp in zip(params, grads, self.state["momentum"], self.tmp):
            loops = fused(self.xp, p, g, buf)
            if loops:  # the same update, as one loop
                loops.update("sgd", flat(p), flat(g), (flat(buf),), self.scalars(lr))
                continue
            if self.wd:
                g += mul(p, self.wd, out=tmp)
            if self.mu:
                buf *= self.mu
                buf += g
                if self.nesterov:
                    g += mul(buf, self.mu, out=tmp)
                else:
                    g = buf
            p -= mul(g, lr, out=tmp)
        self.steps += 1


class Adam:
    slots = ("m", "v")
    replayable = False  # its bias corrections change at every step, on the host

    def __init__(self, xp, params: list, cfg: TrainConfig):
        self.xp = xp
        (self.b1, self.b2), self.wd, self.eps = cfg.betas, cfg.weight_decay, 1e-8
        self.state = {"m": [xp.zeros_like(p) for p in params], "v": [xp.zeros_like(p) for p in params]}
        self.tmp = [xp.empty_like(p) for p in params]
        self.steps = 0

    def scalars(self, lr: float) -> tuple:
        """The fused loops' scalars of the step counted in self.steps (kernels.adam)."""
        c1, c2 = 1.0 - self.b1**self.steps, 1.0 - self.b2**self.steps
        return (f32(lr / c1), f32(self.b1), f32(1.0 - self.b1), f32(self.b2), f32(1.0 - self.b2), f32(c2),
                f32(self.eps), f32(self.wd))

    def step_fused(self, lr: float, loop) -> None:
        """As SGD.step_fused."""
        self.steps += 1
        loop("adam", (flat(self.state["m"][0]), flat(self.state["v"][0])), self.scalars(lr))

    def step(self, params: list, grads: list, lr: float) -> None:
        """As SGD.step."""
        xp, mul = self.xp, self.xp.multiply
        self.steps += 1
        c1 = 1.0 - self.b1**self.steps
        c2 = 1.0 - self.b2**self.steps
        for p, g, m, v, tmp in zip(params, grads, self.state["m"], self.state["v"], self.tmp):
            loops = fused(xp, p, g, m, v)
            if loops:  # the same update, as one loop
                loops.update("adam", flat(p), flat(g), (flat(m), flat(v)), self.scalars(lr))
                continue
            if self.wd:
                g += mul(p, self.wd, out=tmp)
            m *= self.b1
            m += mul(g, 1.0 - self.b1, out=tmp)
            v *= self.b2
            v += mul(mul(g, g, out=tmp), 1.0 - self.b2, out=tmp)
            # p -= lr / c1 * m / (sqrt(v / c2) + eps)
            xp.sqrt(xp.divide(v, c2, out=tmp), out=tmp)
            tmp += self.eps
            xp.divide(m, tmp, out=tmp)
            p -= mul(tmp, lr / c1, out=tmp)


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
