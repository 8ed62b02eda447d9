"""Act on drift: ``imgclf serve --on-drift CMD|URL`` runs a command (or POSTs to a webhook) once per drift episode.

The drift monitor calls ``DriftHook.fire`` when a model's window crosses a threshold (``deploy.monitor``). An
episode is debounced: it fires when drift begins, and not again for the same model version until drift has
been over for ``cooldown`` seconds (a window hovering at a threshold would otherwise fire on every check). The
hook runs on a thread of its own, so a slow, hanging or failing command never blocks or breaks serving: it is
killed after ``timeout`` seconds, and its outcome is logged and counted (``imgclf_on_drift_runs``).

What the hook gets (JSON on the command's stdin, or the webhook's POST body)::

    {"event": "drift", "model": NAME, "version": V, "run": RUN_DIR, "time": ISO-8601 UTC,
     "capture_dir": DIR or null, "report": {the drift report, as GET /drift gives it}}

and a command also the environment variables ``IMGCLF_MODEL``, ``IMGCLF_VERSION``, ``IMGCLF_RUN`` and
``IMGCLF_CAPTURE_DIR``, so ``--on-drift 'imgclf retrain "$IMGCLF_RUN" --new-data "$IMGCLF_CAPTURE_DIR"'`` works
(the command is run by the shell, as cron runs its lines).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

log = logging.getLogger("imgclf")


class DriftHook:
    """Runs ``target`` (a shell command, or an ``http(s)://`` URL) once per drift episode of each model version.

    Args:
        target: the command line or the webhook URL.
        cooldown: seconds drift must have been over before a new episode of the same model version fires.
        timeout: seconds the command (or the HTTP request) may take; killed beyond.
        capture_dir: passed on to the hook (where the served images are kept), or None.
        on_result: called with ``(model key, "ok" | "failed" | "timeout")`` after each run (metrics).
    """

    def __init__(self, target: str, cooldown: float = 600.0, timeout: float = 600.0, capture_dir: str | None = None,
                 on_result: Callable[[str, str], None] | None = None):  # fmt: skip
        self.target, self.cooldown, self.timeout, self.capture_dir = target, cooldown, timeout, capture_dir
        self.on_result = on_result
        self.is_url = target.startswith(("http://", "https://"))
        self._lock = threading.Lock()
        self._episode: dict[str, bool] = {}  # model key -> in a drift episode
        self._over_at: dict[str, float] = {}  # model key -> when its last episode's drift ended
        self.fired = 0
        self.threads: list[threading.Thread] = []

    def update(self, key: str, status: str, payload: Callable[[], dict[str, Any]]) -> bool:
        """Tell the hook a model's drift status after a check; fire (True) when a new episode begins.
        ``payload`` makes the JSON sent (called only when firing)."""
        now = time.monotonic()
        with self._lock:
            active = self._episode.get(key, False)
            if status != "drift":
                if active:
                    self._episode[key], self._over_at[key] = False, now
                return False
            if active:
                return False
            self._episode[key] = True
            if now - self._over_at.get(key, -float("inf")) < self.cooldown:
                return False  # drift came back within the cooldown: the same episode
            self.fired += 1
        t = threading.Thread(target=self._run, args=(key, payload()), name="imgclf-on-drift", daemon=True)
        self.threads = [*(x for x in self.threads if x.is_alive()), t]  # finished runs are not kept
        t.start()
        return True

    def _run(self, key: str, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        try:
            result = self._post(body) if self.is_url else self._command(doc, body)
        except Exception as e:  # noqa: BLE001 - whatever the hook does wrong, serving goes on
            log.warning("--on-drift for %s failed: %s", key, f"{type(e).__name__}: {e}"[:300])
            result = "failed"
        if self.on_result is not None:
            self.on_result(key, result)

    def _command(self, doc: dict[str, Any], body: bytes) -> str:
        env = {**os.environ, "IMGCLF_MODEL": str(doc["model"]), "IMGCLF_VERSION": str(doc["version"]),
               "IMGCLF_RUN": str(doc["run"]), "IMGCLF_CAPTURE_DIR": doc.get("capture_dir") or ""}  # fmt: skip
        log.info("drift on %s:%s: running --on-drift command", doc["model"], doc["version"])
        # a session of its own, so a timeout kills the whole command (a shell's children too, which would
        # otherwise hold its pipes open and keep this thread waiting)
        p = subprocess.Popen(self.target, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, start_new_session=True)  # fmt: skip
        try:
            _, stderr = p.communicate(body, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill(p)
            log.warning("--on-drift command did not finish within %g s and was killed", self.timeout)
            return "timeout"
        if p.returncode != 0:
            err = stderr.decode(errors="replace").strip().splitlines()
            log.warning("--on-drift command exited with %d%s", p.returncode, f": {err[-1][:300]}" if err else "")
            return "failed"
        log.info("--on-drift command finished (exit 0)")
        return "ok"

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "User-Agent": "imgclf-serve"}
        req = urllib.request.Request(self.target, data=body, method="POST", headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 - the user's own URL
            ok = 200 <= r.status < 300
        if not ok:
            log.warning("--on-drift webhook answered %d", r.status)
        return "ok" if ok else "failed"


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # POSIX: the command's whole process group
    except (AttributeError, ProcessLookupError, PermissionError):
        p.kill()
    p.communicate()
