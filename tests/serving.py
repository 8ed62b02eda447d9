"""Helpers for the server tests: start ``imgclf serve`` as a real process, talk HTTP with the standard library."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from PIL import Image


class Served:
    """A running ``imgclf serve`` process on 127.0.0.1 (port chosen by the OS)."""

    def __init__(self, args: list[str], tmp: Path, timeout: float = 240):
        ready = tmp / f"ready-{uuid.uuid4().hex}.json"
        self.log_path = tmp / f"serve-{uuid.uuid4().hex}.log"
        cmd = [sys.executable, "-m", "imgclf.cli", "serve", *map(str, args), "--port", "0", "--ready-file", str(ready)]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        t0 = time.time()
        while not ready.exists():
            if self.proc.poll() is not None or time.time() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"server did not start: {self.log()}")
            time.sleep(0.2)
        self.port = json.loads(ready.read_text())["port"]

    def log(self) -> str:
        return self.log_path.read_text()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=60):
        """(status, headers, body) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        status, _, data = self.request(method, path, body, headers)
        return status, json.loads(data)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def multipart(files: list[tuple[str, bytes]], boundary: str | None = None) -> tuple[bytes, dict]:
    b = boundary or uuid.uuid4().hex
    parts = [
        f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'.encode()
        + b"Content-Type: application/octet-stream\r\n\r\n"
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{b}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={b}"}
