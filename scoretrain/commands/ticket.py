"""The ticket: a found subnetwork in kilobytes (`scoretrain export --to FILE.ticket`). The frozen
weights are not stored: they are regenerated from the run's seed and weight-init spec, exactly as
`fit` drew them (model.init_network: NumPy's default_rng(seed), PCG64, the weights of each layer in
forward order, then float32). What is stored is what training found: one bit per weight for the
mask, the BatchNorm statistics (and affine BN's gamma and beta), the input standardization, and
the SHA-256 of the weights the seed must give. A ticket whose weights come out otherwise (an
edited seed or spec, another NumPy generator or draw order) is refused in one line: it would be
another network. Runs whose weights are not their seed's (dense trains them, IteRand redraws
them) have no ticket.

File: b"SCORETRAIN-TICKET 1\\n", a little-endian u32 n, n bytes of JSON (the header), then the
payload: the masks' bits (np.packbits of each layer's flat mask, concatenated, in forward order),
then the BatchNorm states as float32, each [2, C] or [4, C], in order. docs/run-format.md has the
header's keys.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..run import config as config_mod
from ..data.source import DataInfo
from ..run import store
from ..run.resources import data_info
from ..errors import ScoretrainError
from ..nn.model import init_network

MAGIC = b"SCORETRAIN-TICKET 1\n"


def weights_digest(weights: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for w in weights:
        h.update(np.ascontiguousarray(w, np.float32).tobytes())
    return h.hexdigest()


def regenerate(cfg: config_mod.Config, info: DataInfo) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The frozen weights of cfg's seed, as `fit` drew them (and the initial scores, drawn after)."""
    return init_network(cfg.model, cfg.seed, info.image_shape, info.n_classes)


def to_bytes(run_dir: Path, run: store.Run, cfg: config_mod.Config) -> bytes:
    """The ticket of the run read from run_dir (ScoretrainError where a run has none)."""
    if run.masks is None:
        what = "learns its weights (dense)" if run.scores is None else "has no mask yet (no finished epoch)"
        raise ScoretrainError(f"{run_dir}: no ticket: the run {what}; export it as .npz, .safetensors or .onnx")
    digest = weights_digest(run.weights)
    info = data_info(cfg, run.attrs)
    if digest != weights_digest(regenerate(cfg, info)[0]):
        raise ScoretrainError(f"{run_dir}: no ticket: its weights are not the ones seed {cfg.seed} draws "
                              f"({cfg.model.method} changed them, or another NumPy drew them); export it as .npz, .safetensors or .onnx")
    masks = [np.packbits(np.asarray(m, bool).reshape(-1)) for m in run.masks]
    norms = [np.asarray(s, np.float32) for s in run.norms or []]
    test_acc = run.metrics["test_acc"]
    header = {
        "format": "scoretrain-ticket", "format_version": 1, "spec": config_mod.dump(cfg), "seed": cfg.seed,
        "weights_sha256": digest, "mask_shapes": [list(m.shape) for m in run.masks],
        "batchnorm_shapes": [list(s.shape) for s in norms],
        "input_mean": np.asarray(run.attrs["input_mean"], float).reshape(-1).tolist(),
        "input_std": np.asarray(run.attrs["input_std"], float).reshape(-1).tolist(),
        **info.to_attrs(), "data_digest": run.attrs.get("data_digest"), "data_source": run.attrs.get("data_source"),
        "info": {"run": str(run_dir), "epochs_done": run.epochs_done, "test_acc": test_acc[-1] if test_acc else None,
                 "scoretrain_version": run.attrs.get("scoretrain_version"), "numpy": np.__version__},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(text)) + text + b"".join(m.tobytes() for m in masks) + b"".join(s.tobytes() for s in norms)


@dataclass
class Ticket:
    spec: config_mod.Config
    weights: list[np.ndarray]  # regenerated, checked against the ticket's digest
    scores: list[np.ndarray] | None  # the seed's initial scores (the network's shape; the masks decide)
    masks: list[np.ndarray]
    norms: list[np.ndarray]
    input_mean: list[float]
    input_std: list[float]
    info: dict
    data: DataInfo  # the image shape and classes it was found on
    data_digest: str | None  # and the data's digest, where the run recorded one


def read(path: Path) -> Ticket:
    """A ticket, its weights regenerated (ScoretrainError for a damaged file or weights that do not
    come out as the ticket says)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ScoretrainError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        if not raw.startswith(MAGIC):
            raise ValueError("not a scoretrain ticket")
        n = struct.unpack_from("<I", raw, len(MAGIC))[0]
        at = len(MAGIC) + 4
        header = json.loads(raw[at : at + n])
        at += n
        cfg = config_mod.from_text(header["spec"], f"{path} (its spec)")
        masks, norms = [], []
        for shape in header["mask_shapes"]:
            size = int(np.prod(shape))
            bits = np.frombuffer(raw, np.uint8, (size + 7) // 8, at)
            masks.append(np.unpackbits(bits, count=size).astype(bool).reshape(shape))
            at += (size + 7) // 8
        for shape in header["batchnorm_shapes"]:
            norms.append(np.frombuffer(raw, np.float32, int(np.prod(shape)), at).reshape(shape).copy())
            at += 4 * int(np.prod(shape))
        if at != len(raw):
            raise ValueError(f"{len(raw) - at} bytes more or less than its header says")
    except ScoretrainError:
        raise
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise ScoretrainError(f"{path}: not a readable scoretrain ticket ({e})") from None
    if cfg.seed != header["seed"]:
        raise ScoretrainError(f"{path}: its spec says seed {cfg.seed}, its header seed {header['seed']}: an edited ticket")
    data = data_info(cfg, header)
    weights, scores = regenerate(cfg, data)
    if weights_digest(weights) != header["weights_sha256"]:
        raise ScoretrainError(f"{path}: its weights cannot be regenerated: seed {cfg.seed} and its spec give other weights "
                              f"here (an edited seed or spec, or NumPy {np.__version__} draws otherwise than "
                              f"{header['info'].get('numpy')}); use the run's .npz or .safetensors export")
    return Ticket(cfg, weights, scores, masks, norms, header["input_mean"], header["input_std"], header["info"], data,
                  header.get("data_digest"))
