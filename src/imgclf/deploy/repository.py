"""Hot-swapped versions: a model repository the server watches, and loading/unloading models while it answers.

``imgclf serve --repository REPO`` serves ``REPO/NAME/VERSION/`` run directories (the KServe/Triton layout;
VERSION an integer; hidden folders such as ``retrain``'s ``.retrain-*`` work folders are ignored). At start,
the ``--keep-versions`` highest versions of each name are loaded; then the repository is scanned again every
``--poll-s`` seconds and on SIGHUP, and through KServe v2's repository extension (``POST /v2/repository/index``,
``POST /v2/repository/models/NAME/load`` and ``.../unload``, as ``tritonclient`` calls them).

A new highest version is loaded and warmed up beside the old one (which keeps answering), then takes the
requests that name no version; the versions beyond ``--keep-versions`` are then retired: taken out of routing,
left to finish every request that had already chosen them (to ``--drain-s``), and unloaded. No request fails
because of a swap. A version that fails to load is logged once and retried only when its files change; the
versions already served stay. A version is picked up once its files have been still for a second (a copy in
progress is not read half-written; moving a finished folder into place is instant).

Metrics and drift windows are per version (the ``model`` label is ``NAME:VERSION``), so a new version starts
with an empty drift window and its own counters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ImgclfError
from ..rundir import META_FILE

if TYPE_CHECKING:
    from .server import Server
    from .serving import ServedModel

log = logging.getLogger("imgclf")
SETTLE_S = 1.0  # a version's files must have been still this long before it is read


def scan(root: Path) -> dict[str, dict[int, Path]]:
    """``{name: {version: run dir}}`` of the complete versions under ``root`` (``imgclf.json`` present, files
    still for ``SETTLE_S``). Raises ImgclfError when ``root`` is not a folder."""
    if not root.is_dir():
        raise ImgclfError(f"--repository {root}: not a folder")
    out: dict[str, dict[int, Path]] = {}
    now = time.time()
    for name_dir in sorted(root.iterdir()):
        if name_dir.name.startswith(".") or not name_dir.is_dir():
            continue
        for v in name_dir.iterdir():
            if not (v.name.isdigit() and v.is_dir() and (v / META_FILE).is_file()):
                continue
            if now - _newest(v) < SETTLE_S:
                continue  # still being written
            out.setdefault(name_dir.name, {})[int(v.name)] = v
    return out


def _newest(d: Path) -> float:
    """The latest modification time of ``d`` and the files in it (not recursing into exports)."""
    times = [d.stat().st_mtime]
    for f in d.iterdir():
        try:
            times.append(f.stat().st_mtime)
        except OSError:
            pass
    return max(times)


def _signature(d: Path) -> tuple:
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in d.iterdir() if f.is_file()))


class Repository:
    """The server's model repository: what is loaded from it, what failed, and the load/unload/swap steps.

    Args:
        server: the running server (its ``models`` are changed in place, on the event loop).
        root: the repository folder.
        keep: versions of a name kept loaded (the highest ones).
    """

    def __init__(self, server: Server, root: str | os.PathLike, keep: int = 1):
        self.server, self.root, self.keep = server, Path(root), keep
        self.failed: dict[tuple[str, int], tuple[tuple, str]] = {}  # (name, version) -> (files' signature, error)
        self.unloaded: set[str] = set()  # names unloaded by request: not loaded again until asked
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.swaps = 0

    def initial(self) -> list[tuple[str, str, Path]]:
        """(name, version, run) to load at start: the ``keep`` highest versions of each name."""
        return [(n, str(v), p) for n, vs in scan(self.root).items() for v, p in sorted(vs.items())[-self.keep :]]

    def load_initial(self) -> None:
        """(Before serving.) Load the ``keep`` highest versions of each name; a version that fails is logged and
        left out, as in a rescan. Raises ImgclfError when a version is also given as a RUN argument."""
        from .serving import load_one

        server = self.server
        for name, version, path in self.initial():
            if version in server.models.get(name, {}):
                raise ImgclfError(f"model {name}:{version} is both a RUN argument and in --repository {self.root}")
            try:
                m = load_one(name, version, path, server.opts, "repository")
            except Exception as e:  # noqa: BLE001 - as in a rescan: one broken version must not stop the others
                self._failed(name, int(version), path, _signature(path), e)
                continue
            server.models.setdefault(name, {})[version] = m
            server._attach(m)
        if not server.models:
            log.warning("model repository %s: nothing to serve yet (waiting for REPO/NAME/VERSION/ runs)", self.root)

    async def watch(self, poll_s: float) -> None:
        """Rescan every ``poll_s`` seconds (0: only on SIGHUP) and whenever ``wake`` is set; never raises."""
        while True:
            try:
                async with asyncio.timeout(poll_s or None):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - a vanished repository or a bug of ours: log, keep serving
                log.exception("model repository %s: rescan failed", self.root)

    async def sync(self, only: str | None = None) -> list[str]:
        """Bring the served versions in line with the repository (names in ``unloaded`` are left alone unless
        ``only`` names them); return what changed, as ``loaded NAME:V`` / ``unloaded NAME:V`` lines."""
        async with self.lock:
            found = await asyncio.get_running_loop().run_in_executor(None, scan, self.root)
            changes: list[str] = []
            names = [only] if only else sorted(set(found) | {m.name for m in self._ours()})
            for name in names:
                if name in self.unloaded and only is None:
                    continue
                self.unloaded.discard(name)
                want = dict(sorted(found.get(name, {}).items())[-self.keep :])
                changes += await self._sync_name(name, want)
            return changes

    def _ours(self, name: str | None = None) -> list[ServedModel]:
        return [m for m in self.server.all_models() if m.origin == "repository" and name in (None, m.name)]

    async def _sync_name(self, name: str, want: dict[int, Path]) -> list[str]:
        changes = []
        loaded = {int(m.version): m for m in self._ours(name)}
        for v, path in want.items():
            if v in loaded or v in self._spec_versions(name):
                continue
            if await self._load(name, v, path):
                changes.append(f"loaded {name}:{v}")
        have = {int(m.version): m for m in self._ours(name)}
        if not any(v in have for v in want) and want:
            return changes  # nothing wanted could be loaded: keep serving what is there
        for v, m in sorted(have.items()):
            if v not in want:
                await self.server.retire(m)
                changes.append(f"unloaded {name}:{v}")
        return changes

    def _spec_versions(self, name: str) -> set[int]:
        return {int(m.version) for m in self.server.all_models() if m.name == name and m.origin != "repository"}

    async def _load(self, name: str, version: int, path: Path) -> bool:
        sig = await asyncio.get_running_loop().run_in_executor(None, _signature, path)
        seen = self.failed.get((name, version))
        if seen is not None and seen[0] == sig:
            return False  # failed before and unchanged since
        try:
            await self.server.load(name, str(version), path, origin="repository")
        except Exception as e:  # noqa: BLE001 - a broken version must not stop the server: say why, keep the old
            self._failed(name, version, path, sig, e)
            return False
        self.failed.pop((name, version), None)
        self.swaps += 1
        return True

    def _failed(self, name: str, version: int, path: Path, sig: tuple, e: Exception) -> None:
        """Log a version that did not load and remember why (listed in the index; retried when its files change)."""
        msg = (str(e) if isinstance(e, ImgclfError) else f"{type(e).__name__}: {e}").splitlines()[0][:500]
        log.error("model repository: %s:%d from %s did not load: %s", name, version, path, msg)
        self.failed[(name, version)] = (sig, msg)
        self.server.metrics.model_events.labels(name, "load_failed").inc()

    async def unload(self, name: str) -> list[str]:
        """Retire every served version of ``name`` and keep the watcher from loading it again."""
        async with self.lock:
            ms = [m for m in self.server.all_models() if m.name == name]
            if not ms:
                raise ImgclfError(f"no model named {name!r} is loaded")
            self.unloaded.add(name)
            for m in ms:
                await self.server.retire(m)
            return [f"unloaded {m.key}" for m in ms]

    def index(self) -> list[dict[str, Any]]:
        """KServe/Triton repository index: every version found or served, with its state."""
        try:
            found = scan(self.root)
        except ImgclfError:
            found = {}
        served = {(m.name, m.version) for m in self.server.all_models()}
        rows = []
        for name in sorted(set(found) | {n for n, _ in served}):
            versions = {str(v) for v in found.get(name, {})} | {v for n, v in served if n == name}
            for v in sorted(versions, key=int):
                row = {"name": name, "version": v, "state": "READY" if (name, v) in served else "UNAVAILABLE"}
                fail = self.failed.get((name, int(v)))
                row["reason"] = fail[1] if fail and row["state"] != "READY" else ""
                rows.append(row)
        return rows
