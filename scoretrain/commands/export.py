"""`scoretrain export`: a run's subnetwork as plain arrays in one file, usable without scoretrain:
a NumPy .npz, a .safetensors file (the framework-neutral weights format that PyTorch, JAX and
NumPy load, through the `safetensors` package), or an ONNX model (onnx_export.py).

The file holds the effective weights exactly as the stored network computes with them (for
edge-popup W * mask, for biprop alpha * sign(W) * mask, for supermask W * mask, for dense the
trained W), the ordered layer list as a JSON string, and the input standardization. The layout
is in docs/run-format.md ("Exported subnetworks").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..run import store
from ..run.resources import data_info, network, stored_subnetwork
from ..kernels.backend import Backend
from ..run.config import K_METHODS, Config
from ..errors import ScoretrainError, os_reason

FORMAT = "scoretrain-subnetwork"
FORMAT_VERSION = 1
SUFFIXES = (".npz", ".safetensors", ".onnx", ".ticket")
LAYOUTS = ("scoretrain", "torch-prune")  # the tensors' names and layouts: scoretrain's, or torch.nn.utils.prune's


def architecture(net) -> list[dict]:
    """The layer list as plain dicts (each layer's describe()); weight layers name their array in
    the file."""
    return [layer.describe() for layer in net.layers]


def arrays(run_dir: Path) -> tuple[dict[str, np.ndarray], store.Run, Config]:
    """What the file holds, from a run directory (RunError if it is not a readable run), and the
    run and spec it was read from (run.edited: store.edited's note on its config.yaml)."""
    run_dir = Path(run_dir)
    run, cfg = store.open_run(run_dir)
    if store.live_status(run) == "running":  # its file changes under the export at every epoch
        raise ScoretrainError(f"{run_dir}: the run is still training (pid {run.attrs.get('pid')}); export it once it has "
                              "stopped, or export a copy of its folder")
    # On NumPy whatever device trained it: the same arrays, and no GPU needed to export.
    data = data_info(cfg, run.attrs)
    net = network(cfg, data, Backend(np, "cpu"), run.weights, run.scores, run.norms)
    w_eff = stored_subnetwork(net, run.masks)
    (h, w, c), classes = data.image_shape, data.n_classes
    test_acc = run.metrics["test_acc"]
    dataset = cfg.data.name or run.attrs.get("data_source") or cfg.data.path
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "run": str(run_dir), "dataset": dataset, "classes": list(data.classes),
            "method": cfg.model.method, "arch": cfg.model.arch, "k": cfg.model.k if cfg.model.method in K_METHODS else None,
            "epochs_done": run.epochs_done, "test_acc": test_acc[-1] if test_acc else None,
            "test_acc_on": (f"the first {cfg.data.test_samples} images of the {dataset} test split" if cfg.data.test_samples
                            else f"the whole {dataset} test split"),
            "scoretrain_version": run.attrs.get("scoretrain_version")}
    out = {f"weight_{i:02d}": np.array(we, dtype=np.float32) for i, we in enumerate(w_eff)}  # copies of the views
    out.update({f"batchnorm_{i:02d}": np.array(s, dtype=np.float32) for i, s in enumerate(net.norm_state())})  # [mean, var]
    out.update(
        architecture=np.array(json.dumps(architecture(net))),
        info=np.array(json.dumps(info)),
        input_mean=np.asarray(run.attrs["input_mean"], np.float32).reshape(-1),
        input_std=np.asarray(run.attrs["input_std"], np.float32).reshape(-1),
        image_shape=np.array([h, w, c], np.int64),
        n_classes=np.array(classes, np.int64),
    )
    return out, run, cfg


def torch_prune_tensors(run: store.Run, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The subnetwork in PyTorch's pruning convention (torch.nn.utils.prune), for the module tree
    docs/run-format.md builds from `architecture` (an nn.Sequential, a residual block's `main` and
    `shortcut` inside it): per conv or linear `<name>.weight_orig` and `<name>.weight_mask` (float
    0/1; their product is the effective weight; weight_orig holds the frozen W where the mask
    prunes), per BatchNorm `running_mean`, `running_var`, `num_batches_tracked` (and affine
    `weight`, `bias`), in PyTorch's layouts: conv weights [out, in, kh, kw], and a linear layer
    after a flatten taking its inputs in channels-first order, as nn.Flatten gives them."""
    tensors = {}

    def weight(name: str, spec: dict, flat_from):
        i = int(spec["weight"].split("_")[1])
        w_eff = out[spec["weight"]]
        mask = run.masks[i] if run.masks is not None else np.ones(w_eff.shape, bool)
        orig = np.where(mask, w_eff, run.weights[i]).astype(np.float32)
        mask = mask.astype(np.float32)
        if spec["type"] == "conv":
            orig, mask = orig.transpose(0, 3, 1, 2), mask.transpose(0, 3, 1, 2)
        elif flat_from is not None:  # inputs (h, w, c) -> nn.Flatten's (c, h, w) order
            h, w, c = flat_from
            order = np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)
            orig, mask = orig[:, order], mask[:, order]
        tensors[f"{name}.weight_orig"], tensors[f"{name}.weight_mask"] = np.ascontiguousarray(orig), np.ascontiguousarray(mask)

    def walk(layers: list, prefix: str, shape: tuple) -> tuple:
        h, w, c = shape
        flat_from = None
        for j, spec in enumerate(layers):
            name, kind = f"{prefix}{j}", spec["type"]
            if kind in ("conv", "linear"):
                weight(name, spec, flat_from)
                flat_from = None
                if kind == "conv":
                    o, k = spec["shape"][0], spec["shape"][1]
                    p = k // 2 if spec["padding"] == "same" else int(spec["padding"])
                    h, w, c = (h + 2 * p - k) // spec["stride"] + 1, (w + 2 * p - k) // spec["stride"] + 1, o
            elif kind == "batchnorm":
                state = out[spec["state"]]
                tensors[f"{name}.running_mean"], tensors[f"{name}.running_var"] = state[0].copy(), state[1].copy()
                tensors[f"{name}.num_batches_tracked"] = np.array(0, np.int64)
                if spec["affine"]:
                    tensors[f"{name}.weight"], tensors[f"{name}.bias"] = state[2].copy(), state[3].copy()
            elif kind in ("maxpool", "avgpool"):
                h, w = h // spec["size"], w // spec["size"]
            elif kind == "flatten":
                flat_from = (h, w, c)
            elif kind == "global_avg_pool":
                h = w = 1
            elif kind == "residual":
                end = walk(spec["main"], f"{name}.main.", (h, w, c))
                if spec["shortcut"] != "identity":
                    walk(spec["shortcut"], f"{name}.shortcut.", (h, w, c))
                h, w, c = end
        return h, w, c

    walk(json.loads(str(out["architecture"])), "", tuple(int(v) for v in out["image_shape"]))
    tensors["input_mean"], tensors["input_std"] = out["input_mean"], out["input_std"]
    return tensors


def safetensors_parts(out: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The .npz's arrays as safetensors tensors, and its strings and shapes as the file's
    metadata (which holds strings only)."""
    tensors = {k: np.ascontiguousarray(v) for k, v in out.items() if k.startswith(("weight_", "batchnorm_", "input_"))}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "architecture": str(out["architecture"]),
            "info": str(out["info"]), "image_shape": json.dumps(out["image_shape"].tolist()), "n_classes": str(int(out["n_classes"]))}
    return tensors, meta


def export(run_dir: Path, dest: Path, force: bool = False, layout: str = "scoretrain") -> tuple[dict[str, np.ndarray], str | None]:
    """Write the file atomically (a temporary file renamed over `dest`): a reader never sees half
    a file. The suffix picks the format: .npz, .safetensors or .onnx. An existing `dest` is
    refused unless `force`."""
    dest = Path(dest)
    if dest.is_dir():
        raise ScoretrainError(f"{dest}: is a folder; --to takes a file name, e.g. {dest / 'subnet.npz'}")
    if layout not in LAYOUTS:
        raise ScoretrainError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "torch-prune" and dest.suffix != ".safetensors":
        raise ScoretrainError(f"{dest}: --layout torch-prune writes a .safetensors file (safetensors.torch.load_file); name it FILE.safetensors")
    if dest.suffix not in SUFFIXES:
        raise ScoretrainError(f"{dest}: unknown format {dest.suffix or '(no suffix)'}; name the file FILE.npz, FILE.safetensors, FILE.onnx or FILE.ticket")
    if dest.exists() and not force:
        raise ScoretrainError(f"{dest}: already exists (use --force to overwrite it)")
    if dest.parent.exists() and not dest.parent.is_dir():
        raise ScoretrainError(f"{dest.parent}: not a folder (a file): give --to a path in a folder")
    out, run, cfg = arrays(run_dir)  # run.h5 read once, for every format
    encoded = None  # the whole file, made before anything is written (a missing package, a run with no ticket: one line)
    if dest.suffix == ".onnx":
        from . import onnx_export

        encoded = onnx_export.model_bytes(out)
    elif dest.suffix == ".ticket":
        from . import ticket

        encoded = ticket.to_bytes(run_dir, run, cfg)

    def write(tmp: Path) -> None:
        if encoded is not None:
            tmp.write_bytes(encoded)
            return
        if dest.suffix == ".safetensors":
            from safetensors.numpy import save

            tensors, metadata = safetensors_parts(out)
            if layout == "torch-prune":
                tensors = torch_prune_tensors(run, out)
            tmp.write_bytes(save(tensors, metadata=metadata))  # written here: a full disk is an OSError
            return
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a path
            np.savez_compressed(fh, **out)  # masked weights are mostly zeros

    made = store.missing_parents(dest.parent)  # created as `fit --runs-dir` creates its folder; removed again on failure
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.write_atomic(dest, write)
    except BaseException as e:
        store.remove_folders(made)
        if isinstance(e, OSError):
            raise ScoretrainError(f"{dest}: cannot write ({os_reason(e)})") from None
        raise
    return out, run.edited
