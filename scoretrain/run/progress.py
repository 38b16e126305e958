"""What `fit` shows: live epoch and batch bars on a terminal, one line per epoch, a summary.

When output is not a terminal (CI logs, pipes, files) there are no bars and no colour: only
the header, the epoch lines and the summary, so logs stay readable.
"""

from __future__ import annotations

import math
import statistics
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import store
from .config import K_METHODS

REFRESH_SECONDS = 0.25  # how often the live loss is read back (a device sync on a GPU)


def describe(cfg) -> str:
    m = cfg.model
    net = "-".join(map(str, m.widths)) if m.arch == "mlp" else f"{m.arch} x{m.width:g}"
    k = f", k={m.k:g}" + (" (global)" if m.k_scope == "global" else "") if m.method in K_METHODS else ""
    return f"{m.method} {net}{k}, {m.init}, {cfg.train.optimizer} lr={cfg.train.lr:g}, {cfg.train.epochs} epochs"


def epoch_line(row: dict, epochs: int) -> str:
    val = "" if math.isnan(row["val_acc"]) else f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%  "
    return (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  lr {row['lr']:.4g}  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  {val}"
            f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%  "
            f"{row['epoch_seconds']:.2f} s")



class Reporter:
    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.live = console.is_terminal and not quiet
        self.progress = None

    def start(self, run_dir, cfg, backend, epochs_done: int) -> None:
        self.epochs = cfg.train.epochs
        self.batch_size = cfg.train.batch_size
        if not self.quiet:
            resumed = f", resuming after epoch {epochs_done}" if epochs_done else ""
            self.console.print(f"fit {run_dir}: {describe(cfg)} on {backend.name} ({backend.device}){resumed}", soft_wrap=True)
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console, transient=True,
            )
            self.progress.start()
            self.epoch_task = self.progress.add_task("epochs", total=self.epochs, completed=epochs_done, info="")
            self.batch_task = self.progress.add_task("batches", total=1, info="")

    def epoch_start(self, epoch: int, epochs: int, lr: float, n_batches: int) -> None:
        self.t0 = self.last = time.perf_counter()
        if self.progress:
            self.progress.reset(self.batch_task, total=n_batches, info="")

    def batch(self, done: int, read_running) -> None:
        if not self.progress:
            return
        now = time.perf_counter()
        if now - self.last < REFRESH_SECONDS:
            return
        self.last = now
        loss, acc = read_running()
        rate = done * self.batch_size / (now - self.t0)
        info = f"loss {loss:.4f} acc {100 * acc:.2f}% {rate:,.0f} samples/s"
        self.progress.update(self.batch_task, completed=done, info=info)

    def epoch_end(self, row: dict) -> None:
        if self.progress:
            self.progress.update(self.epoch_task, completed=row["epoch"])
        if not self.quiet:
            self.console.print(epoch_line(row, self.epochs), soft_wrap=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None


def summary(console: Console, run_dir, run) -> None:
    m = run.metrics
    table = Table(title=f"run {run_dir}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("status", run.attrs.get("status", "?")), ("epochs", str(run.epochs_done))]
    if m["epoch"]:
        best = max(range(len(m["test_acc"])), key=m["test_acc"].__getitem__)
        rows += [
            ("final test acc", f"{100 * m['test_acc'][-1]:.2f}%  (loss {m['test_loss'][-1]:.4f})"),
            ("best test acc", f"{100 * m['test_acc'][best]:.2f}%  (epoch {m['epoch'][best]})"),
        ]
        chosen = store.best_by_validation(m)
        if chosen is not None:
            rows.append(("test acc at best val", f"{100 * m['test_acc'][chosen]:.2f}%  (epoch {m['epoch'][chosen]}, "
                                                 f"val acc {100 * m['val_acc'][chosen]:.2f}%)"))
        rows += [
            ("final train acc", f"{100 * m['train_acc'][-1]:.2f}%"),
            ("seconds / epoch", f"{statistics.median(m['epoch_seconds']):.2f} (median)"),
        ]
    rows.append(("written to", str(run_dir)))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
