"""Side by side, as docs/performance.md reports it: the resnet20 x0.5 step of `scoretrain bench --net
resnet20` (its conv engine, train.conv_engine: auto) against the PyTorch peer (tools/torch_peer.py),
and the LeNet step against another checkout's (`--baseline DIR`: the code before, im2col), and with
`--im2col` both steps on this checkout's im2col engine too. Each
command is its own process; the commands take turns for `--rounds` rounds, and each reports its
best (noise only ever adds time). A benchmark, not a test. Run it alone on the machine, under the
CPU lock where one is shared:

    flock /tmp/scoretrain-cpu.lock .venv/bin/python tools/conv_side_by_side.py --baseline /tmp/before
"""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_step(cmd: list[str], pythonpath: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=pythonpath)
    found = re.search(r"([0-9.]+) s/step", out.stdout)
    if out.returncode or not found:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}): {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return float(found.group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="a checkout of the code to compare LeNet against (e.g. a git worktree)")
    p.add_argument("--im2col", action="store_true", help="also time both steps on this checkout's im2col engine")
    args = p.parse_args()
    py = sys.executable
    bench = lambda net, *more: [py, "-m", "scoretrain", "bench", "--net", net, "--device", "cpu", "--json", os.devnull, *more]  # noqa: E731
    cases = {"resnet20: scoretrain": (bench("resnet20"), ROOT), "resnet20: PyTorch peer": ([py, "tools/torch_peer.py"], ROOT),
             "lenet: scoretrain": (bench("lenet"), ROOT)}
    if args.im2col:
        cases["resnet20: scoretrain im2col"] = (bench("resnet20", "--conv-engine", "im2col"), ROOT)
        cases["lenet: scoretrain im2col"] = (bench("lenet", "--conv-engine", "im2col"), ROOT)
    if args.baseline:
        cases["resnet20: baseline"] = (bench("resnet20"), args.baseline.resolve())
        cases["lenet: baseline"] = (bench("lenet"), args.baseline.resolve())
    times = {name: [] for name in cases}
    for r in range(args.rounds):
        for name, (cmd, where) in cases.items():
            times[name].append(seconds_per_step(cmd, where))
            print(f"round {r + 1}: {name}: {times[name][-1]:.4f} s/step", flush=True)
    best = {name: min(t) for name, t in times.items()}
    print("\nbest of each (s/step):", ", ".join(f"{n} {b:.4f}" for n, b in best.items()))
    print(f"resnet20 x0.5 step, peer / scoretrain: {best['resnet20: PyTorch peer'] / best['resnet20: scoretrain']:.2f}")
    if args.baseline:
        print(f"resnet20 step, baseline / scoretrain: {best['resnet20: baseline'] / best['resnet20: scoretrain']:.2f}")
        print(f"lenet step (an epoch is 469 of them), baseline / scoretrain: {best['lenet: baseline'] / best['lenet: scoretrain']:.2f}")
    if args.im2col:
        for net in ("resnet20", "lenet"):
            print(f"{net} step, im2col / the config's engine: {best[f'{net}: scoretrain im2col'] / best[f'{net}: scoretrain']:.2f}")


if __name__ == "__main__":
    main()
