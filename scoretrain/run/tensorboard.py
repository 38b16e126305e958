"""TensorBoard scalars of a run (train.tensorboard: true): each finished epoch's losses and
accuracies, learning rate, k, seconds, and how much each layer's mask moved, as event files in
RUN_DIR/tensorboard (`tensorboard --logdir runs/` shows every run by its folder's name). Written
with tensorboardX (`pip install 'scoretrain[tensorboard]'`), a small writer that needs neither
TensorFlow nor PyTorch. A resumed run adds an event file of its own, its steps going on from the
epoch it resumes at.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import ConfigError

FOLDER = "tensorboard"
SCALARS = {"loss/train": "train_loss", "loss/test": "test_loss", "loss/val": "val_loss", "accuracy/train": "train_acc",
           "accuracy/test": "test_acc", "accuracy/val": "val_acc", "lr": "lr", "mask_change/total": "mask_change",
           "epoch_seconds": "epoch_seconds"}


def writer_class():
    """tensorboardX's SummaryWriter, or a ConfigError (exit 2, before the run starts) naming the extra."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard: needs the tensorboardX package: pip install 'scoretrain[tensorboard]' "
                          "(or set train.tensorboard=false)") from None
    return SummaryWriter


class EpochLog:
    """The event file this process writes for a run."""

    def __init__(self, run_dir: Path, first_epoch: int):
        # tensorboardX names a file by the second it was made and the host: a resume within the
        # same second would take the same name and overwrite the first session's file. The suffix
        # keeps each session's name its own, and in epoch order (TensorBoard reads the files in
        # name order, and drops the later steps where an earlier one follows them).
        suffix = f".epoch{first_epoch:06d}.{os.getpid()}"
        self.writer = writer_class()(logdir=str(Path(run_dir) / FOLDER), filename_suffix=suffix)

    def epoch(self, row: dict, k: float, layer_changes: list[float] | None) -> None:
        """An epoch's scalars at step = its number (1-based): nan ones (no validation split; a
        dense run's mask change) are left out."""
        step, w = row["epoch"], self.writer
        for tag, key in SCALARS.items():
            if not math.isnan(row[key]):
                w.add_scalar(tag, row[key], step)
        w.add_scalar("k", k, step)
        for i, change in enumerate(layer_changes or []):
            w.add_scalar(f"mask_change/layer_{i:02d}", change, step)
        w.flush()  # each epoch readable at once, as run.h5 is

    def close(self) -> None:
        self.writer.close()
