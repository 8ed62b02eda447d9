"""Per-epoch metrics to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard when installed)."""

from __future__ import annotations

import csv
import json
import os
import weakref
from pathlib import Path
from typing import Any

from ..config import Config, dump_yaml
from ..errors import ImgclfError
from ..io import write_text
from ..rundir import LOCK_FILE, METRICS_CSV, METRICS_JSONL, RunDir

_HELD_LOCKS: weakref.WeakSet = weakref.WeakSet()


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker), close the copies of the run-lock files. flock locks belong
    to the open file description, so a worker that outlives a SIGKILLed trainer for a few seconds would
    otherwise keep the run locked and make ``train --resume`` fail with "being trained by another process"."""
    for f in list(_HELD_LOCKS):
        f.close()  # the parent's descriptor (and its lock) is untouched


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def hold_run_lock(run_dir: Path):
    """An exclusive lock on ``run_dir/run.lock`` for as long as the returned file stays open (the process
    lives): a second ``train --name`` cannot write into a run that is still training. None without fcntl.
    Forked children do not keep the lock (see ``_close_inherited_locks``)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return None
    f = open(run_dir / LOCK_FILE, "a")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ImgclfError(
            f"{run_dir} is being trained by another process; wait for it or pick another --name"
        ) from None
    _HELD_LOCKS.add(f)
    return f


def run_is_live(run_dir: Path) -> bool:
    """Another process holds ``run_dir``'s lock (it is training there now)."""
    path = run_dir / LOCK_FILE
    if not path.exists():
        return False
    try:
        import fcntl
    except ImportError:
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


class RunLogger:
    """Appends one row per epoch; only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        self.lock = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = hold_run_lock(self.run_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(RunDir(self.run_dir).tensorboard))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def save_config(self, cfg: Config) -> None:
        if self.enabled:
            write_text(RunDir(self.run_dir).config, dump_yaml(cfg))

    def log_epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._truncate_after(row["epoch"] - 1)
        with open(RunDir(self.run_dir).metrics_jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        path = RunDir(self.run_dir).metrics_csv
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    self.tb.add_scalar(k, v, row["epoch"])

    def _truncate_after(self, epoch: int) -> None:
        """After a resume, drop rows of epochs that the interrupted run logged past its checkpoint."""
        for name in (METRICS_JSONL, METRICS_CSV):
            path = self.run_dir / name
            if not path.exists():
                continue
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            if name.endswith(".csv"):
                head, body = lines[:1], lines[1:]
                keep = head + body[:epoch]
            else:
                keep = lines[:epoch]
            if len(keep) != len(lines):
                write_text(path, "".join(keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.lock is not None:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            self.lock.close()
            self.lock = None
