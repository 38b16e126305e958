"""The image-folder cache, measured: MNIST written as a PNG class-folder tree (60,000 train and
10,000 test images, 28x28 grayscale), then loaded twice in fresh processes with an empty cache:
the first load decodes every PNG and writes the cache, the second reads the cache.

    flock /tmp/scoretrain-cpu.lock .venv/bin/python tools/folder_cache_bench.py [--dir DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = """
import sys, time
t = time.perf_counter()
from scoretrain.data.folders import ImageFolder
ds = ImageFolder(sys.argv[1], threads=int(sys.argv[2])).load()
print(f"{time.perf_counter() - t:.2f} {len(ds.x_train)} {len(ds.x_test)} {ds.x_train.shape[1:]}")
"""


def write_pngs(folder: Path) -> None:
    """DIR/{train,test}/<digit>/<index>.png, zero-padded so that name order is index order."""
    from PIL import Image

    from scoretrain.data.datasets import load

    ds = load("mnist")
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        for c in range(10):
            (folder / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(x, y)):
            Image.fromarray(img[..., 0]).save(folder / split / str(label) / f"{i:05d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "scoretrain-mnist-png")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.dir / "test").is_dir():
        t = time.perf_counter()
        write_pngs(args.dir)
        print(f"wrote {args.dir} in {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SCORETRAIN_DATA": cache}
        for run in ("first (decode + cache write)", "second (from the cache)"):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", LOAD, str(args.dir), str(args.threads)], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            wall = time.perf_counter() - t
            print(f"{run:<30} load {out[0]} s, process {wall:.2f} s ({out[1]} train + {out[2]} test images)")


if __name__ == "__main__":
    main()
