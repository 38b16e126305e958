"""Bad input, through the real command line: every case is one `error: ...` line (what, where,
what was expected) on stderr, nothing on stdout, no traceback, exit 2 for a config error and 1
otherwise, and every run already in the runs folder is left byte for byte as it was."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from conftest import merged
from typer.testing import CliRunner

from scoretrain.kernels import backend
from scoretrain.data import datasets as data
from scoretrain.cli import app

ROOT = Path(__file__).resolve().parent.parent
FC = str(ROOT / "configs/mnist_fc.yaml")
MNIST = data.REPO_DATA / "mnist"
FILES = [fn for fn, _ in data.DATASETS["mnist"].files.values()]
runner = CliRunner()


class World:
    """A runs folder with a completed run and broken ones, broken configs and broken data."""

    def __init__(self, base: Path, small: list[str]):
        self.base, self.small = base, small
        self.runs = base / "runs"
        result = runner.invoke(app, ["fit", FC, *merged(small, ["train.epochs=1"]), "--runs-dir", str(self.runs), "--name", "done", "-q"])
        assert result.exit_code == 0, result.output
        done = self.runs / "done"
        good = (done / "run.h5").read_bytes()
        config = (done / "config.yaml").read_bytes()
        for name, h5 in {"corrupt": b"this is not HDF5", "truncated": good[: len(good) // 2], "newer": good, "foreign": None}.items():
            (self.runs / name).mkdir()
            (self.runs / name / "config.yaml").write_bytes(config)
            if h5 is not None:
                (self.runs / name / "run.h5").write_bytes(h5)
        with h5py.File(self.runs / "newer" / "run.h5", "a") as f:
            f.attrs["format_version"] = 2
        with h5py.File(self.runs / "foreign" / "run.h5", "w") as f:
            f["x"] = [1, 2, 3]
        (self.runs / "empty").mkdir()
        (self.runs / "notes.txt").write_text("not a run\n")
        # configs
        cfg = base / "cfg"
        cfg.mkdir()
        (cfg / "folder.yaml").mkdir()
        (cfg / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01 not text")
        (cfg / "syntax.yaml").write_text("model:\n  k: 0.5\n  widths: [784, 10\ntrain:\n  lr: 0.1\n")
        (cfg / "list.yaml").write_text("- model\n- train\n")
        (cfg / "typo.yaml").write_text("model:\n  wdiths: [784, 64, 10]\n")
        (cfg / "locked.yaml").write_text("seed: 1\n")
        (cfg / "locked.yaml").chmod(0)
        self.cfg = cfg
        # data: a folder per damage; the undamaged files are links to the shipped ones
        for case in ("no-files", "one-missing", "truncated", "flipped"):
            (base / case / "mnist").mkdir(parents=True)
            if case != "no-files":
                for fn in FILES:
                    (base / case / "mnist" / f"{fn}.gz").symlink_to(MNIST / f"{fn}.gz")
        (base / "one-missing" / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
        labels = "t10k-labels-idx1-ubyte.gz"
        blob = (MNIST / labels).read_bytes()
        self.damage("truncated", labels, blob[:1000])
        raw = bytearray(gzip.decompress(blob))
        raw[100] ^= 1  # one bit of one label: still a valid gzip and IDX file
        self.damage("flipped", labels, gzip.compress(bytes(raw)))

    def damage(self, case, fn, blob):
        path = self.base / case / "mnist" / fn
        path.unlink()
        path.write_bytes(blob)

    def snapshot(self):
        return {str(p.relative_to(self.runs)): (p.read_bytes() if p.is_file() else None) for p in sorted(self.runs.rglob("*"))}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    from conftest import SMALL

    return World(tmp_path_factory.mktemp("bad"), list(SMALL))


def fit(w, *args):
    return ["fit", *merged(args), "--runs-dir", str(w.runs)]  # a case's override in place of w.small's


def gpu_present() -> bool:
    return backend._cupy()[0] is not None


# (id, args of w, exit code, fragments of the one line)
CASES = [
    # the config file
    ("config missing", lambda w: fit(w, str(w.cfg / "nope.yaml"), *w.small), 2,
     ["nope.yaml: config file not found"]),
    ("config is a folder", lambda w: fit(w, str(w.cfg / "folder.yaml"), *w.small), 2,
     ["folder.yaml: cannot read config file", "Is a directory"]),
    ("config not text", lambda w: fit(w, str(w.cfg / "binary.yaml"), *w.small), 2,
     ["binary.yaml: cannot read config file", "UnicodeDecodeError"]),
    ("config without read permission", lambda w: fit(w, str(w.cfg / "locked.yaml"), *w.small), 2,
     ["locked.yaml: cannot read config file", "Permission denied"]),
    ("config YAML syntax", lambda w: fit(w, str(w.cfg / "syntax.yaml"), *w.small), 2,
     ["syntax.yaml:4:", "YAML syntax error"]),
    ("config not a mapping", lambda w: fit(w, str(w.cfg / "list.yaml"), *w.small), 2,
     ["list.yaml: expected a mapping of sections", "got list"]),
    ("config unknown key", lambda w: fit(w, str(w.cfg / "typo.yaml"), *w.small), 2,
     ["typo.yaml: model.wdiths: unknown key (did you mean 'model.widths'?)"]),
    # overrides: unknown keys, types, ranges, shapes
    ("unknown key", lambda w: fit(w, FC, *w.small, "model.kk=0.3"), 2, ["mnist_fc.yaml: model.kk: unknown key (did you mean 'model.k'?)"]),
    ("unknown section", lambda w: fit(w, FC, *w.small, "trian.lr=0.1"), 2, ["trian: unknown key (did you mean 'train'?)"]),
    ("k not a number", lambda w: fit(w, FC, *w.small, "model.k=high"), 2, ["model.k: expected a number, got 'high'"]),
    ("epochs not an integer", lambda w: fit(w, FC, *w.small, "train.epochs=2.5"), 2, ["train.epochs: expected an integer, got 2.5"]),
    ("nesterov not a bool", lambda w: fit(w, FC, *w.small, "train.nesterov=3"), 2, ["train.nesterov: expected true or false, got 3"]),
    ("widths not a list", lambda w: fit(w, FC, *w.small, "model.widths=784"), 2, ["model.widths: expected a list of integers, got 784"]),
    ("section as a value", lambda w: fit(w, FC, *w.small, "model=3"), 2, ["model: expected a mapping of keys, got 3"]),
    ("k zero", lambda w: fit(w, FC, *w.small, "model.k=0"), 2, ["model.k: expected a fraction in (0, 1], got 0.0"]),
    ("k above one", lambda w: fit(w, FC, *w.small, "model.k=1.5"), 2, ["model.k: expected a fraction in (0, 1], got 1.5"]),
    ("k negative", lambda w: fit(w, FC, *w.small, "model.k=-0.2"), 2, ["model.k: expected a fraction in (0, 1], got -0.2"]),
    ("lr zero", lambda w: fit(w, FC, *w.small, "train.lr=0"), 2, ["train.lr: expected a positive number, got 0.0"]),
    ("lr negative", lambda w: fit(w, FC, *w.small, "train.lr=-0.1"), 2, ["train.lr: expected a positive number, got -0.1"]),
    ("epochs zero", lambda w: fit(w, FC, *w.small, "train.epochs=0"), 2, ["train.epochs: expected a positive integer, got 0"]),
    ("batch size zero", lambda w: fit(w, FC, *w.small, "train.batch_size=0"), 2, ["train.batch_size: expected a positive integer, got 0"]),
    ("batch size negative", lambda w: fit(w, FC, *w.small, "train.batch_size=-5"), 2, ["train.batch_size: expected a positive integer, got -5"]),
    ("widths input", lambda w: fit(w, FC, *w.small, "model.widths=[100,64,10]"), 2, ["model.widths[0]: expected 784 (the inputs of mnist), got 100"]),
    ("widths classes", lambda w: fit(w, FC, *w.small, "model.widths=[784,64,9]"), 2, ["model.widths[-1]: expected 10 (the classes of mnist), got 9"]),
    ("widths too short", lambda w: fit(w, FC, *w.small, "model.widths=[784]"), 2, ["model.widths: expected at least two widths"]),
    ("device unknown", lambda w: fit(w, FC, *w.small, "device=tpu"), 2, ["device: expected auto, cpu, gpu or gpu:N, got 'tpu'"]),
    ("override without =", lambda w: fit(w, FC, *w.small, "model.k"), 2, ["override 'model.k': expected key=value, e.g. model.k=0.3"]),
    ("override without key", lambda w: fit(w, FC, *w.small, "=0.3"), 2, ["override '=0.3': expected a dotted key like train.lr"]),
    ("override into a value", lambda w: fit(w, FC, *w.small, "seed.x=1"), 2, ["override 'seed.x=1': seed is not a section"]),
    ("no config at all", lambda w: fit(w), 2, ["fit needs a config file"]),
    # the data
    ("data root missing", lambda w: fit(w, FC, *w.small, f"data.root={w.base / 'nowhere'}"), 1,
     ["dataset mnist: files not found in", "nowhere/mnist", "(expected train-images-idx3-ubyte"]),
    ("data folder empty", lambda w: fit(w, FC, *w.small, f"data.root={w.base / 'no-files'}"), 1,
     ["dataset mnist: files not found in", "no-files/mnist"]),
    ("data file missing", lambda w: fit(w, FC, *w.small, f"data.root={w.base / 'one-missing'}"), 1,
     ["dataset mnist: files not found in", "one-missing/mnist", "train-labels-idx1-ubyte"]),
    ("data file truncated", lambda w: fit(w, FC, *w.small, f"data.root={w.base / 'truncated'}"), 1,
     ["truncated/mnist/t10k-labels-idx1-ubyte.gz: cannot read"]),
    ("data file checksum", lambda w: fit(w, FC, *w.small, f"data.root={w.base / 'flipped'}"), 1,
     ["flipped/mnist/t10k-labels-idx1-ubyte.gz: SHA-256 mismatch", "expected ff7bcfd416de", "corrupt or not t10k-labels-idx1-ubyte"]),
    # the device
    ("no GPU", lambda w: fit(w, FC, *w.small[:-1], "device=gpu"), 1, ["device gpu: no usable GPU", "use device=cpu"]),
    ("no GPU for eval", lambda w: ["eval", str(w.runs / "done"), "--device", "gpu"], 1, ["device gpu: no usable GPU"]),
    # the run folder
    ("name taken", lambda w: fit(w, FC, *w.small, "--name", "done"), 1, ["runs/done: a run with this name already exists"]),
    ("name with a slash", lambda w: fit(w, FC, *w.small, "--name", "a/b"), 1, ["--name 'a/b': use letters, digits"]),
    ("runs-dir is a file", lambda w: ["fit", FC, *w.small, "--runs-dir", str(w.runs / "notes.txt")], 1,
     ["notes.txt: --runs-dir must be a folder, but this is a file"]),
    # eval
    ("eval missing folder", lambda w: ["eval", str(w.runs / "missing")], 1, ["runs/missing: no such run directory"]),
    ("eval not a run", lambda w: ["eval", str(w.runs / "empty")], 1, ["runs/empty: not a scoretrain run (no run.h5)"]),
    ("eval a file", lambda w: ["eval", str(w.runs / "notes.txt")], 1, ["notes.txt: not a run directory (a file)"]),
    ("eval corrupt", lambda w: ["eval", str(w.runs / "corrupt")], 1, ["corrupt/run.h5: corrupt or truncated run file"]),
    ("eval truncated", lambda w: ["eval", str(w.runs / "truncated")], 1, ["truncated/run.h5: corrupt or truncated run file", "truncated file"]),
    ("eval foreign HDF5", lambda w: ["eval", str(w.runs / "foreign")], 1, ["foreign/run.h5: not a scoretrain run file (format attribute None)"]),
    ("eval newer format", lambda w: ["eval", str(w.runs / "newer")], 1, ["newer/run.h5: format_version 2 is newer than this scoretrain", "reads (1); upgrade scoretrain"]),
    ("eval bad device", lambda w: ["eval", str(w.runs / "done"), "--device", "tpu"], 2, ["device: expected auto, cpu, gpu or gpu:N, got 'tpu'"]),
    # resume
    ("resume completed", lambda w: ["fit", "--resume", str(w.runs / "done")], 1, ["runs/done: the run is already completed (1 epoch); nothing to resume"]),
    ("resume with a config", lambda w: ["fit", FC, "--resume", str(w.runs / "done")], 2, ["--resume takes no config or overrides"]),
    ("resume with overrides", lambda w: ["fit", "--resume", str(w.runs / "done"), "train.epochs=5"], 2, ["--resume takes no config or overrides"]),
    ("resume missing", lambda w: ["fit", "--resume", str(w.runs / "missing")], 1, ["runs/missing: no such run directory"]),
    ("resume not a run", lambda w: ["fit", "--resume", str(w.runs / "empty")], 1, ["runs/empty: not a scoretrain run (no run.h5)"]),
    ("resume corrupt", lambda w: ["fit", "--resume", str(w.runs / "corrupt")], 1, ["corrupt/run.h5: corrupt or truncated run file"]),
    ("resume newer format", lambda w: ["fit", "--resume", str(w.runs / "newer")], 1, ["format_version 2 is newer"]),
]


@pytest.mark.parametrize("args,code,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_no_run(w, args, code, fragments, request):
    case = request.node.callspec.id
    if "GPU" in case and gpu_present():
        pytest.skip("CuPy and a GPU are present")
    if "permission" in case and os.geteuid() == 0:
        pytest.skip("root reads a file without read permission")
    before = w.snapshot()
    result = runner.invoke(app, args(w))
    assert result.exit_code == code, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert w.snapshot() == before  # no run touched, none created


@pytest.mark.parametrize("args,code,fragment", [
    (lambda w: ["fit", str(w.cfg / "syntax.yaml"), "--runs-dir", str(w.runs)], 2, "YAML syntax error"),
    (lambda w: ["fit", FC, *w.small, f"data.root={w.base / 'flipped'}", "--runs-dir", str(w.runs)], 1, "SHA-256 mismatch"),
    (lambda w: ["eval", str(w.runs / "newer")], 1, "format_version 2 is newer"),
    (lambda w: ["fit", "--resume", str(w.runs / "done")], 1, "already completed"),
], ids=["config", "data", "eval", "resume"])
def test_a_real_process_prints_one_unwrapped_line_on_stderr(w, args, code, fragment, tmp_path):
    """In a real process with output to a pipe (an 80-column console for rich): long paths stay on one line."""
    before = w.snapshot()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.run([sys.executable, "-m", "scoretrain", *args(w)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ") and fragment in proc.stderr
    assert len(proc.stderr) > 80  # long enough that wrapping would have shown
    assert w.snapshot() == before
