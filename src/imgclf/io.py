"""Atomic file writes and small JSON/YAML helpers shared by every stage."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class _Writes:
    discard = False  # torchrun ranks other than 0 of the commands that run on every rank: rank 0 alone writes


def discard_writes(on: bool = True) -> None:
    """Make every ``atomic_path`` write of this process go to a scratch file that is then deleted (set by the CLI on
    torchrun ranks other than 0, which run the same command as rank 0 but must not write its files)."""
    _Writes.discard = on


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step.

    A crash (or SIGKILL) while writing leaves the previous file intact and at most a stray ``.tmp`` file.
    """
    if _Writes.discard:
        with tempfile.TemporaryDirectory(prefix="imgclf-rank-") as d:
            yield Path(d) / Path(path).name
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600; use the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_safetensors(path: str | os.PathLike, state: dict[str, Any], meta: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors atomically (tensors copied to CPU, so shared storage is fine)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta or {}))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def copy_into(src: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Copy the file or folder ``src`` into ``dest_dir`` under its own name, atomically (a folder is copied to a
    temporary sibling and renamed into place, replacing one there). Returns the new path."""
    import shutil

    src, dest = Path(src), Path(dest_dir) / Path(src).name
    if src.is_dir():
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    else:
        atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
    return dest
