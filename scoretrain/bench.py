"""`scoretrain bench`: seconds per epoch and samples per second of the training step on the
current backend, edge-popup against dense, with the time split between its phases.

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

import numpy as np

from . import optim
from .backend import Backend
from .config import Config, ModelConfig, TrainConfig
from .model import Network, cross_entropy, init_network
from .train import stepper

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
    replay on a GPU, train.stepper)."""
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
    if quick:
        main = [(w, b, max(2, s // 5), 2) for w, b, s, _ in main]
        scaling = [(w, b, max(2, s // 5), 2) for w, b, s, _ in scaling]
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
