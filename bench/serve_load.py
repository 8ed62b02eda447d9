"""Bounded load test of the HTTP server: imgclf serve with batching, without batching, and LitServe.

Each target is started as its own process on 127.0.0.1 serving the same run with the same runtime;
``--clients`` concurrent clients (asyncio + aiohttp, in this process) each send one Fashion-MNIST
test image per request (multipart, PNG) back to back until ``--requests`` answers or ``--seconds``
have passed, after ``--warmup`` untimed requests. Reported per target: throughput (images/s),
latency p50/p90/p99, errors, and for imgclf the mean batch size from /metrics; top-1 answers are
compared across targets. Everything stops by itself. Writes bench/results/serve_load.json.

Usage: python bench/serve_load.py RUN [--clients 32] [--requests 4000] [--targets imgclf imgclf-nobatch litserve]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from demo_seeds import machine

from imgclf.artifact import package_versions
from imgclf.data.sources import open_source
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(target: str, run: str, port: int, log, runtime: str = "auto") -> subprocess.Popen:
    exe = [sys.executable]
    if target.startswith("imgclf"):
        cmd = [*exe, "-m", "imgclf.cli", "serve", run, "--port", str(port), "--max-queue", "4096", "--runtime", runtime]
        if target == "imgclf-nobatch":
            cmd.append("--no-batching")
    elif target == "litserve":
        cmd = [*exe, str(HERE / "litserve_app.py"), run, str(port), "--runtime", runtime]
    else:
        raise SystemExit(f"unknown target {target}")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.time()
    async with aiohttp.ClientSession() as s:
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout} s")


async def load(url: str, images: list[bytes], clients: int, n_req: int, seconds: float, warmup: int) -> dict:
    lat: list[float] = []
    answers: dict[int, str] = {}
    errors: dict[str, int] = {}
    counter = iter(range(10**9))
    deadline = [0.0]

    async def one(s: aiohttp.ClientSession, i: int, record: bool) -> None:
        form = aiohttp.FormData()
        form.add_field("content", images[i % len(images)], filename=f"{i}.png", content_type="image/png")
        t0 = time.perf_counter()
        try:
            async with s.post(url, data=form) as r:
                body = await r.read()
                ok = r.status == 200
        except aiohttp.ClientError as e:
            ok, body = False, type(e).__name__.encode()
        if not record:
            return
        if ok:
            lat.append(time.perf_counter() - t0)
            doc = json.loads(body)
            top = (doc.get("predictions") or [doc])[0]["top"][0]["label"]
            answers[i % len(images)] = top
        else:
            key = body[:60].decode("utf-8", "replace")
            errors[key] = errors.get(key, 0) + 1

    async def client(s: aiohttp.ClientSession) -> None:
        while True:
            i = next(counter)
            if i >= n_req or time.perf_counter() > deadline[0]:
                return
            await one(s, i, True)

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        await asyncio.gather(*(one(s, i, False) for i in range(warmup)))
        deadline[0] = time.perf_counter() + seconds
        t0 = time.perf_counter()
        await asyncio.gather(*(client(s) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ms = np.array(lat or [float("nan")]) * 1000
    return {
        "requests_ok": len(lat),
        "errors": errors,
        "seconds": round(wall, 2),
        "img_per_s": round(len(lat) / wall, 1),
        "latency_ms": {q: round(float(np.percentile(ms, int(q[1:]))), 1) for q in ("p50", "p90", "p99")},
        "answers": answers,
    }


async def mean_batch(base: str) -> float | None:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        text = await r.text()
    s_ = sum(float(v) for v in re.findall(r"^imgclf_batch_size_sum\{[^}]*\} (\S+)", text, re.M))
    c = sum(float(v) for v in re.findall(r"^imgclf_batch_size_count\{[^}]*\} (\S+)", text, re.M))
    return round(s_ / c, 2) if c else None


def encoded_images(n: int) -> list[bytes]:
    src = open_source("builtin:fashion-mnist:test")
    out = []
    for i in np.random.default_rng(0).permutation(len(src))[:n]:  # the subset is stored sorted by class
        buf = io.BytesIO()
        src.load(int(i)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def run_target(target: str, a, images: list[bytes], logdir: Path) -> dict:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with open(logdir / f"{target}.log", "w") as log:
        proc = start(target, a.run, port, log, a.runtime)
        try:
            health = base + ("/v2/health/ready" if target.startswith("imgclf") else "/health")
            asyncio.run(wait_ready(health, proc))
            res = asyncio.run(load(base + "/predict", images, a.clients, a.requests, a.seconds, a.warmup))
            if target.startswith("imgclf"):
                res["mean_batch"] = asyncio.run(mean_batch(base))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    res["target"] = target
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--targets", nargs="+", default=["imgclf", "imgclf-nobatch", "litserve"])
    ap.add_argument("--runtime", default="auto", help="for every target (auto: the fastest, as imgclf serve picks)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--seconds", type=float, default=60.0, help="stop a target after this long")
    ap.add_argument("--warmup", type=int, default=64)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    images = encoded_images(a.images)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in a.targets:
            r = run_target(t, a, images, Path(tmp))
            lat = r["latency_ms"]
            print(f"{t:16s} {r['img_per_s']:8.1f} img/s  p50 {lat['p50']:7.1f} ms  p90 {lat['p90']:7.1f} ms  "
                  f"p99 {lat['p99']:7.1f} ms  ok {r['requests_ok']}  errors {sum(r['errors'].values())}  "
                  f"mean batch {r.get('mean_batch')}", flush=True)  # fmt: skip
            results.append(r)
    ref = results[0]["answers"]
    for r in results:
        common = set(ref) & set(r["answers"])
        r["top1_agreement_with_first"] = round(sum(ref[i] == r["answers"][i] for i in common) / max(len(common), 1), 4)
        r.pop("answers")
    by = {r["target"]: r["img_per_s"] for r in results}
    from imgclf.deploy.runtime import resolve_runtime

    doc = {
        "run": a.run,
        "runtime": resolve_runtime(a.runtime, a.run),
        "clients": a.clients,
        "requests": a.requests,
        "command": "python bench/serve_load.py " + " ".join(sys.argv[1:]),
        "results": results,
        "batching_speedup": round(by["imgclf"] / by["imgclf-nobatch"], 2)
        if {"imgclf", "imgclf-nobatch"} <= set(by)
        else None,
        "vs_litserve": round(by["imgclf"] / by["litserve"], 2) if {"imgclf", "litserve"} <= set(by) else None,
        "machine": machine(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(a.out)
    runs = json.loads(out.read_text()) if out.is_file() else {}
    runs = runs if "by_runtime" in runs else {"by_runtime": {}}
    runs["by_runtime"][doc["runtime"]] = doc
    write_json(out, runs)
    print(f"batching speed-up {doc['batching_speedup']}x, vs LitServe {doc['vs_litserve']}x -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
