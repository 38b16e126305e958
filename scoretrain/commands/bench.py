"""`scoretrain bench`: seconds per epoch and samples per second of the training step on the
current backend, edge-popup against dense, with the time split between its phases; with
`--net lenet` or `--net resnet20`, the step of that shipped config (configs/mnist_NET.yaml: its
network, batch size and learning rate), split by layer kind and phase.

Throughput is timed over consecutive steps with a single device sync at the end, as training
runs. Shared machines are noisy, so the two methods of a case are timed in alternating rounds
and each reports its fastest round (as `timeit` does: noise only ever adds time); the JSON
keeps every round. The phase split is a separate pass that syncs after each phase (slower in
total on a GPU, but it attributes the time). Epoch time is steps-per-epoch times the time per step.
"""

from __future__ import annotations

import math
import resource
import socket
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..run import config as config_mod
from ..nn import optim
from ..kernels import conv_engine
from ..kernels.backend import Backend
from ..run.config import Config, ModelConfig, TrainConfig
from ..errors import ConfigError
from ..nn.layers import BatchNorm, Conv2d, GlobalAvgPool, Linear, MaxPool2d, ReLU, ResidualBlock, walk, weight_layers
from ..nn.model import Network, cross_entropy, init_network
from ..run.step import stepper
from ..run.train import enter_epoch

TRAIN_SAMPLES = 60000  # an MNIST epoch


def rss_mb() -> float:
    """Current resident set size of this process, in MiB (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_used_mb(backend: Backend) -> float | None:
    return backend.xp.get_default_memory_pool().used_bytes() / 2**20 if backend.is_gpu else None


def make(backend: Backend, method: str, widths: list[int], batch: int, k: float = 0.5):
    """The network, its optimizer, and the training step as `fit` takes it (a CUDA graph's
    replay on a GPU, step.stepper)."""
    cfg = Config(model=ModelConfig(method=method, widths=widths, k=k), train=TrainConfig(batch_size=batch))
    weights, scores = init_network(cfg.model, seed=0)
    net = Network(backend.xp, cfg.model, weights, scores)
    opt = optim.make(backend.xp, net.params, cfg.train)
    return net, opt, stepper(cfg, backend, net, opt)


def measure_pair(backend: Backend, x, y, methods: list[str], widths: list[int], batch: int, steps: int,
                 split_steps: int, rounds: int) -> list[dict]:
    """Each method's figures; the methods take turns, `rounds` rounds of `steps` steps each."""
    xp = backend.xp
    n = len(y)
    perm = xp.asarray(np.random.default_rng(0).permutation(n))
    starts = [(i * batch) % (n - batch + 1) for i in range(steps)]
    batches = [perm[s : s + batch] for s in starts]
    cases = []
    for method in methods:
        net, opt, step = make(backend, method, widths, batch)
        with step.stream:
            for idx in batches[:3]:  # warm-up: first-call costs (BLAS threads, kernels compiled, the graph captured)
                step(x[idx], y[idx], 0.01)
            backend.sync()
        cases.append((net, opt, step, []))
    rss0 = rss_mb()
    for _ in range(rounds):
        for net, opt, step, times in cases:
            with step.stream:
                t0 = time.perf_counter()
                for idx in batches:
                    step(x[idx], y[idx], 0.01)
                backend.sync()
                times.append((time.perf_counter() - t0) / steps)
    rss1 = rss_mb()
    results = []
    for method, (net, opt, step, times) in zip(methods, cases):
        per_step = min(times)
        results.append({
            "method": method, "widths": widths, "batch_size": batch, "steps": steps, "rounds": rounds,
            "seconds_per_step": per_step,
            "seconds_per_step_rounds": times,
            "seconds_per_epoch": per_step * math.ceil(TRAIN_SAMPLES / batch),
            "samples_per_second": batch / per_step,
            "split": split(backend, net, opt, x, y, batches[:split_steps]),
            "rss_growth_mb": rss1 - rss0,
            "gpu_used_mb": gpu_used_mb(backend),
            "cuda_graph": step.replaying,  # the timed steps were a graph's replays
        })
    return results


def split(backend: Backend, net, opt, x, y, batches) -> dict:
    """The fraction of a step in each of train_step's four phases, each timed to its end:
    select (the masks and W_eff), forward (with the loss), backward (dL/dW_eff) and update (the
    straight-through gradient and the optimizer). On the CPU, edge-popup's update also makes the
    next top-k's pass over the scores (kernels.score_step), and select only settles the bands."""
    phases = dict(select=0.0, forward=0.0, backward=0.0, update=0.0)
    clock = time.perf_counter
    for idx in batches:
        xb, yb = x[idx], y[idx]
        t0 = clock()
        w_eff = net.effective_weights()
        backend.sync()
        t1 = clock()
        logits, caches = net.forward(xb, w_eff)
        _, _, dlogits = cross_entropy(backend.xp, logits, yb)
        backend.sync()
        t2 = clock()
        net.backward(caches, w_eff, dlogits)
        backend.sync()
        t3 = clock()
        net.update(opt, 0.01)
        backend.sync()
        t4 = clock()
        for name, a, b in zip(phases, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            phases[name] += b - a
    total = sum(phases.values())
    return {k: v / total for k, v in phases.items()}


def plan(quick: bool) -> tuple[list, list]:
    """(main cases, width-scaling cases) as (widths, batch, steps per round, rounds)."""
    small, wide = [784, 250, 250, 10], [784, 2000, 2000, 10]
    # Many short rounds: a round is a fraction of a second, shorter than most bursts of load from
    # other tenants, so that each method's best round is a quiet one.
    main = [(small, 128, 50, 15), (small, 1024, 8, 15), (wide, 128, 10, 5), (wide, 1024, 2, 5)]
    scaling = [([784, w, w, 10], 128, 15, 6) for w in (100, 250, 500, 1000, 2000)]
    if quick:  # a smoke run: the scaling cases up to 250 wide
        main = [(w, b, max(2, s // 5), 2) for w, b, s, _ in main]
        scaling = [(w, b, max(2, s // 5), 2) for w, b, s, _ in scaling[:2]]
    return main, scaling


def run(backend: Backend, x, y, quick: bool, console) -> dict:
    """Every case of plan(), a line each as it is measured, then the tables. Returns the figures."""
    results = {"backend": backend.name, "device": backend.device, "host": socket.gethostname(), "main": [], "scaling": []}
    console.print(f"bench on {backend.name} ({backend.device}); epoch = {TRAIN_SAMPLES} MNIST samples; "
                  "edge-popup and dense take turns, each case's best round is shown", soft_wrap=True)
    main_cases, scaling = plan(quick)
    for group, cases in (("main", main_cases), ("scaling", scaling)):
        for widths, batch, steps, rounds in cases:
            for r in measure_pair(backend, x, y, ["edge-popup", "dense"], widths, batch, steps, min(steps, 30), rounds):
                results[group].append(r)
                split_ = " ".join(f"{k} {100 * v:.0f}%" for k, v in r["split"].items())
                console.print(f"{group:7} {r['method']:10} {'-'.join(map(str, widths)):17} batch {batch:5}  "
                              f"{r['seconds_per_epoch']:8.3f} s/epoch  {r['samples_per_second']:>11,.0f} samples/s  "
                              f"[{split_}]  RSS +{r['rss_growth_mb']:.1f} MiB{'  (CUDA graph)' if r['cuda_graph'] else ''}",
                              soft_wrap=True, markup=False)
    results["peak_rss_mb"] = peak_rss_mb()
    results["peak_gpu_mb"] = max((r["gpu_used_mb"] or 0) for r in results["main"] + results["scaling"]) if backend.is_gpu else None
    console.print(table(results["main"], f"bench: {backend.name} ({backend.device})"))
    console.print(table(results["scaling"], "cost against width (784-w-w-10, batch 128)"))
    gpu = f", peak GPU memory in use {results['peak_gpu_mb']:.0f} MiB" if backend.is_gpu else ""
    console.print(f"peak RSS {results['peak_rss_mb']:.0f} MiB{gpu}; RSS growth over each timed run is shown per line (0: nothing accumulates per step)")
    return results


def table(rows: list[dict], title: str):
    """Edge-popup against dense, case by case: seconds per epoch, their ratio, samples/s."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("widths", "batch", "edge-popup s/epoch", "dense s/epoch", "ratio", "edge-popup samples/s", "dense samples/s"):
        t.add_column(col, justify="right")
    pairs = {}
    for r in rows:
        pairs.setdefault(("-".join(map(str, r["widths"])), r["batch_size"]), {})[r["method"]] = r
    for (widths, batch), p in pairs.items():
        ep, d = p["edge-popup"], p["dense"]
        t.add_row(widths, str(batch), f"{ep['seconds_per_epoch']:.3f}", f"{d['seconds_per_epoch']:.3f}",
                  f"{ep['seconds_per_epoch'] / d['seconds_per_epoch']:.2f}", f"{ep['samples_per_second']:,.0f}", f"{d['samples_per_second']:,.0f}")
    return t


# --- the conv and residual nets: a shipped config's step, by layer kind and phase ---------------------

NETS = ("mlp", "lenet", "resnet20")  # --net: mlp is the cases above; the others configs/mnist_NET.yaml
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
KINDS = {Conv2d: "conv", BatchNorm: "batchnorm", ReLU: "relu", ResidualBlock: "residual add", GlobalAvgPool: "pool",
         MaxPool2d: "pool", Linear: "linear"}


def recipe(net: str) -> Config:
    """configs/mnist_NET.yaml, as `fit` reads it."""
    path = CONFIGS / f"mnist_{net}.yaml"
    if not path.is_file():
        raise ConfigError(f"--net {net}: {path} is missing (bench --net reads the shipped configs of a checkout)")
    return config_mod.load(path, [])


def measure_net(backend: Backend, x, y, net_name: str, steps: int, rounds: int, split_steps: int, engine_name: str | None = None) -> dict:
    """The shipped config's training step as `fit` takes it, on its conv engine (train.conv_engine,
    or `engine_name`): its best round of `steps` steps, and where a step's time goes (layer_split)."""
    cfg = recipe(net_name)
    engine = conv_engine.resolve(engine_name or cfg.train.conv_engine, backend.xp)
    with conv_engine.using(engine):
        return {**_measure_net(backend, x, y, net_name, cfg, steps, rounds, split_steps), "conv_engine": engine.describe()}


def _measure_net(backend: Backend, x, y, net_name: str, cfg: Config, steps: int, rounds: int, split_steps: int) -> dict:
    h, w, c = x.shape[1:]
    weights, scores = init_network(cfg.model, cfg.seed, (h, w, c), 10)
    net = Network(backend.xp, cfg.model, weights, scores, (h, w, c), 10)
    opt = optim.make(backend.xp, net.params, cfg.train)
    enter_epoch(net, cfg, 0)
    step, batch, lr = stepper(cfg, backend, net, opt), cfg.train.batch_size, cfg.train.lr
    n = len(y)
    perm = backend.xp.asarray(np.random.default_rng(0).permutation(n))
    batches = [perm[(i * batch) % (n - batch + 1):][:batch] for i in range(steps)]
    times = []
    with step.stream:
        for idx in batches[:3]:  # first calls: BLAS threads, compiled loops, the graph captured
            step(x[idx], y[idx], lr)
        backend.sync()
        for _ in range(rounds):
            t0 = time.perf_counter()
            for idx in batches:
                step(x[idx], y[idx], lr)
            backend.sync()
            times.append((time.perf_counter() - t0) / steps)
    per_step = min(times)
    return {"net": net_name, "arch": cfg.model.arch, "width": cfg.model.width, "method": cfg.model.method, "batch_size": batch,
            "lr": lr, "steps": steps, "rounds": rounds, "seconds_per_step": per_step, "seconds_per_step_rounds": times,
            "seconds_per_epoch": per_step * math.ceil(TRAIN_SAMPLES / batch), "samples_per_second": batch / per_step,
            "split": layer_split(backend, net, opt, x, y, batches[:split_steps], lr), "cuda_graph": step.replaying,
            **convs_alone(backend, net, x[batches[0]], rounds)}


def layer_split(backend: Backend, net, opt, x, y, batches, lr) -> dict:
    """Seconds per step in each layer kind's forward and backward pass (a block's own: its residual
    add, without its layers'), the mask selection, the loss and the update (the straight-through
    gradient and the optimizer), each timed to its end, from a pass that syncs after every layer."""
    clock, spent, inner = time.perf_counter, defaultdict(float), []

    def timed(name, f):
        def call(*args, **kwargs):
            backend.sync()
            t0 = clock()
            inner.append(0.0)
            out = f(*args, **kwargs)
            backend.sync()
            dt = clock() - t0
            spent[name] += dt - inner.pop()  # its own time: not its children's
            if inner:
                inner[-1] += dt
            return out
        call.fusable = True  # a block still fuses the layers it times (nn/layers.py own_code)
        return call

    layers = list(walk(net.layers))
    for layer in layers:
        kind = KINDS.get(type(layer), type(layer).__name__.lower())
        layer.forward, layer.backward = timed(f"{kind} forward", layer.forward), timed(f"{kind} backward", layer.backward)
    try:
        select, loss, update = timed("mask selection", net.effective_weights), timed("loss", cross_entropy), timed("update", net.update)
        for idx in batches:
            xb, yb = x[idx], y[idx]
            w_eff = select()
            logits, caches = timed("forward", net.forward)(xb, w_eff)
            _, _, dlogits = loss(backend.xp, logits, yb)
            timed("backward", net.backward)(caches, w_eff, dlogits)
            del caches, logits  # as in a step: the next forward does not run beside this one's memory
            update(opt, lr)
    finally:
        for layer in layers:  # the instance attributes go: the class's methods again
            del layer.forward, layer.backward
    spent["other forward"], spent["other backward"] = spent.pop("forward"), spent.pop("backward")  # outside the layers
    return {k: v / len(batches) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}


def convs_alone(backend: Backend, net, xb, rounds: int) -> dict:
    """Seconds per step of the conv engine's own work (convs_alone): every conv of the net
    (convs_timed), forward and both gradients (the input's where the step takes it), each run by
    itself on arrays of the shapes it has in the step (the best of `rounds`). The step less this
    is what the rest of it costs."""
    w_eff, seen = net.effective_weights(), []
    convs = [l for l in walk(net.layers) if isinstance(l, Conv2d)]
    for conv in convs:  # one forward pass, to see each conv's input
        conv.forward = lambda x, w, train, conv=conv: (seen.append((conv, x.copy())), type(conv).forward(conv, x, w, train))[1]
    try:
        net.forward(xb, w_eff)
    finally:
        for conv in convs:
            del conv.forward
    first = weight_layers([net.layers[net.first]])[0]  # the step takes no input gradient there
    engine, best = conv_engine.current(), float("inf")
    for _ in range(rounds):
        backend.sync()
        spent = 0.0
        for conv, x in seen:
            w = w_eff[conv.index]
            t0 = time.perf_counter()
            y, kept = engine.forward(conv, x, w)
            engine.backward(conv, backend.xp.ones_like(y), kept, w, backend.xp.empty_like(w), conv is not first)
            backend.sync()
            spent += time.perf_counter() - t0
        best = min(best, spent)
    return {"convs_alone": best, "convs_timed": len(seen)}


def run_net(backend: Backend, x, y, net_name: str, quick: bool, console, engine_name: str | None = None) -> dict:
    """The --net case: a line of figures, then its split as a table."""
    from rich.table import Table

    steps, rounds = (3, 2) if quick else (10, 5)
    r = measure_net(backend, x, y, net_name, steps, rounds, min(steps, 5), engine_name)
    console.print(f"bench on {backend.name} ({backend.device}): configs/mnist_{net_name}.yaml ({r['method']} {r['arch']} "
                  f"x{r['width']:g}, batch {r['batch_size']}, lr {r['lr']:g}): {r['seconds_per_step']:.4f} s/step (best of {rounds} "
                  f"rounds of {steps}), {r['seconds_per_epoch']:.1f} s/epoch, {r['samples_per_second']:,.0f} samples/s"
                  f"{'  (CUDA graph)' if r['cuda_graph'] else ''}; conv engine {r['conv_engine']}", soft_wrap=True, markup=False)
    console.print(f"the conv engine's own work (each conv by itself, forward and gradients, on its shapes in the step): "
                  f"{1000 * r['convs_alone']:.1f} ms a step; the rest of the step: {1000 * (r['seconds_per_step'] - r['convs_alone']):.1f} ms",
                  soft_wrap=True, markup=False)
    t = Table(title="where a step goes (a pass that syncs after each layer; a ReLU run inside a BatchNorm or a pool counts there)",
              title_justify="left")
    for col in ("phase", "ms / step", "share"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    total = sum(r["split"].values())
    for name, sec in r["split"].items():
        t.add_row(name, f"{1000 * sec:.2f}", f"{100 * sec / total:.1f}%")
    console.print(t)
    return {"backend": backend.name, "device": backend.device, "host": socket.gethostname(), "net": r, "peak_rss_mb": peak_rss_mb()}
