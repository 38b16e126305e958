"""`make gpu-check`: the GPU path's checks and figures in one command, for a machine with a GPU.

It needs no install step and no network: it runs this checkout with the machine's own Python
(PYTHONPATH=the repo; numpy, cupy, h5py, typer, rich, pyyaml and numba must be there, pytest for
the GPU tests). In order, each with its own time limit:

  1. the GPU tests (tests/test_gpu.py), then kernels.cu on the CPU executor
     (tests/test_cuda_executor.py: every kernel against its oracle under AddressSanitizer; the
     dry run, the radix select's and the optimizers'); both skipped where pytest is missing;
  2. `scoretrain bench --device gpu`;
  3. `scoretrain fit configs/mnist_fc.yaml` on the GPU (its steps replayed as CUDA graphs), again
     with train.cuda_graph=false (the same bits are expected), and on the CPU for reference;
  4. `scoretrain eval` of the GPU run on both devices.

It writes report.md and report.json into --out (default gpu-check/): each step's command, exit
status, seconds and figures, and the GPU targets (mnist_fc <= 0.10 s/epoch at batch 128,
>= 1e6 samples/s at batch 1024, edge-popup within 1.2x of dense, the GPU run within 0.2 points of
the CPU run, eval reproducing the record on both devices, the graph's run equal to the other). Exit 0 when every step ran and every
target holds. `--dry-run` does the same on the CPU with small settings: CI runs that, so the
script itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's scoretrain, installed or not
FC = str(ROOT / "configs/mnist_fc.yaml")
SMALL = ["data.train_samples=2000", "data.test_samples=500", "train.epochs=1"]  # --dry-run's fit


def run(name: str, args: list[str], timeout: int, steps: list[dict]) -> dict:
    """One step: a command in its own process, with the repo on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, e.stdout or "", f"timed out after {timeout} s"
    step = {"step": name, "command": " ".join(args), "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "tail": (out + err)[-1500:] if isinstance(out + err, str) else ""}
    steps.append(step)
    print(f"{name}: exit {rc} in {step['seconds']} s", flush=True)
    return step


def bench_figures(path: Path) -> dict:
    """s/epoch and samples/s of the 784-250-250-10 cases, and edge-popup / dense."""
    rows = [r for r in json.loads(path.read_text())["main"] if r["widths"][1] == 250]
    got = {f"{r['method']} b{r['batch_size']}": r for r in rows}
    out = {}
    for batch in (128, 1024):
        ep, dense = got.get(f"edge-popup b{batch}"), got.get(f"dense b{batch}")
        if ep and dense:
            out[f"b{batch}"] = {"edge_popup_s_per_epoch": ep["seconds_per_epoch"], "dense_s_per_epoch": dense["seconds_per_epoch"],
                                "edge_popup_samples_per_s": ep["samples_per_second"], "ratio": ep["seconds_per_epoch"] / dense["seconds_per_epoch"],
                                "cuda_graph": bool(ep.get("cuda_graph"))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, small settings: checks the script, not the GPU")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check", help="folder for report.md, report.json, the runs")
    a = parser.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dev, small, quick = ("cpu", SMALL, ["--quick"]) if a.dry_run else ("gpu", [], [])
    steps: list[dict] = []
    try:
        import pytest  # noqa: F401

        run("gpu tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], 240, steps)
        # kernels.cu on the CPU executor (g++, ASan): what CI proves; the dry run (in CI, whose suite runs them all) a few
        run("executed kernels", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_executor.py",
                                 *(["-k", "radix_select_kernels or optimizer_kernels"] if a.dry_run else [])], 300, steps)
    except ImportError:
        for name, test in (("gpu tests", "test_gpu.py"), ("executed kernels", "test_cuda_executor.py")):
            steps.append({"step": name, "command": f"pytest tests/{test}", "rc": None, "seconds": 0, "tail": "pytest is not installed"})
    run("bench", ["-m", "scoretrain", "bench", "--device", dev, *quick, "--json", str(out / "bench.json")], 240, steps)
    run("fit gpu", ["-m", "scoretrain", "fit", FC, f"device={dev}", *small, "--runs-dir", str(out / "runs"), "--name", "gpu", "-q"], 180, steps)
    run("fit gpu, no graph", ["-m", "scoretrain", "fit", FC, f"device={dev}", "train.cuda_graph=false", *small, "--runs-dir", str(out / "runs"),
                              "--name", "gpu-eager", "-q"], 180, steps)
    run("fit cpu", ["-m", "scoretrain", "fit", FC, "device=cpu", *small, "--runs-dir", str(out / "runs"), "--name", "cpu", "-q"], 180, steps)
    evals = {where: run(f"eval on {where}", ["-m", "scoretrain", "eval", str(out / "runs" / "gpu"), "--json", "--device", d], 120, steps)
             for where, d in (("the run's device", dev), ("the cpu", "cpu"))}

    figures, targets = {}, {}
    if (out / "bench.json").exists():
        figures["bench"] = bench_figures(out / "bench.json")
        b128, b1024 = figures["bench"].get("b128"), figures["bench"].get("b1024")
        if b128:
            targets["mnist_fc at batch 128 <= 0.10 s/epoch"] = b128["edge_popup_s_per_epoch"] <= 0.10
            targets["edge-popup within 1.2x of dense (batch 128)"] = b128["ratio"] <= 1.2
        if b1024:
            targets[">= 1e6 samples/s at batch 1024"] = b1024["edge_popup_samples_per_s"] >= 1e6
    results = {}
    for d, step in evals.items():
        if step["rc"] == 0:
            results[d] = json.loads(step["tail"].strip().splitlines()[-1])
    if results:
        figures["eval"] = {d: {k: r[k] for k in ("device", "test_acc", "matches_record", "masks_match_scores")} for d, r in results.items()}
        targets["eval reproduces the record on both devices"] = len(results) == 2 and all(r["matches_record"] for r in results.values())
    try:
        from scoretrain.run import store

        runs = {n: store.load(out / "runs" / n).metrics for n in ("gpu", "gpu-eager", "cpu")}
        figures["fit"] = {n: {"final_test_acc": m["test_acc"][-1], "median_epoch_seconds": statistics.median(m["epoch_seconds"])}
                          for n, m in runs.items()}
        targets["the CUDA graph's run gives the metrics of the run without one, bit for bit"] = all(
            runs["gpu"][k] == runs["gpu-eager"][k] for k in ("train_loss", "test_loss", "test_acc"))
        targets["GPU run within 0.2 points of the CPU run"] = abs(runs["gpu"]["test_acc"][-1] - runs["cpu"]["test_acc"][-1]) <= 0.002
    except Exception as e:  # a fit that did not run: its step says why
        figures["fit"] = {"error": f"{type(e).__name__}: {e}"}
    if a.dry_run:  # on the CPU the speed targets are not the GPU's: the dry run checks the script
        targets = {k: v for k, v in targets.items() if "s/epoch" not in k and "samples/s" not in k and "1.2x" not in k}

    ok = all(s["rc"] in (0, None) for s in steps) and all(targets.values())
    report = {"dry_run": a.dry_run, "ok": ok, "steps": steps, "figures": figures, "targets": targets}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"# gpu-check{' (dry run, CPU)' if a.dry_run else ''}: {'PASS' if ok else 'FAIL'}", "", "| step | exit | s |", "| --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
    lines += ["", "| target | holds |", "| --- | --- |"] + [f"| {k} | {'yes' if v else 'NO'} |" for k, v in targets.items()]
    lines += ["", "```", json.dumps(figures, indent=1), "```"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"{'PASS' if ok else 'FAIL'}: {out / 'report.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
