"""Bounded load test of ``imgclf serve`` with a compiled client (wrk), against the raw runtime in the same run.

Everything on 127.0.0.1, every case of fixed length, everything stopping by itself:

1. serve: ``imgclf serve RUN`` with its defaults; wrk (``bench/serve_wrk.lua``) posts one image per request,
   28 px Fashion-MNIST test PNGs (the data the run was trained on) and 224 px JPEGs made from them, with
   ``--connections`` clients; in the same rounds, the raw runtime is called in this process on batches of 32
   preprocessed images (no HTTP: the reference of the ratios); answers are checked against it afterwards;
2. overload: ``imgclf serve RUN --max-queue 16 --max-inflight 24 --max-images 16``; capacity with 16 clients,
   then 64 clients that retry at once ignoring Retry-After (issue 15's case) and 10x the capacity run's
   clients (160), on keep-alive connections and with a new connection per request; goodput = 200 answers/s.

The cases of each server are interleaved in ``--rounds`` rounds, since the cores may be shared and their load
drifts; every case records the machine's load (load average, busy cores, the server's and wrk's CPU and what
the rest of the machine took). Writes bench/results/serve_wrk.json and prints a summary table.

Usage: python bench/serve_wrk.py RUN [--runtime auto] [--seconds 15] [--rounds 3] [--connections 32]
Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from demo_seeds import machine

from imgclf.artifact import package_versions
from imgclf.io import write_json

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "serve_wrk.json"
LUA = HERE / "serve_wrk.lua"
OVERLOAD = ["--max-queue", "16", "--max-inflight", "24", "--max-images", "16"]


def make_images(folder: Path, n: int) -> dict[str, Path]:
    """Lists of image files for wrk: ``png28`` (Fashion-MNIST test images as they are) and ``jpeg224`` (the
    same images upscaled to 224 px, bicubic, JPEG quality 90). Returns {kind: list file}."""
    from PIL import Image

    from imgclf.data.sources import open_source

    src = open_source("builtin:fashion-mnist:test")
    lists = {}
    for kind in ("png28", "jpeg224"):
        (folder / kind).mkdir(parents=True)
        paths = []
        for k, i in enumerate(np.random.default_rng(0).permutation(len(src))[:n]):
            img = src.load(int(i))
            path = folder / kind / f"{k:04d}.{'png' if kind == 'png28' else 'jpg'}"
            if kind == "png28":
                img.save(path, "PNG")
            else:
                img.resize((224, 224), Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
            paths.append(str(path))
        lists[kind] = folder / f"{kind}.txt"
        lists[kind].write_text("\n".join(paths) + "\n")
    return lists


def pixels_of(files: list[str], art) -> np.ndarray:
    """The server's preprocessing of ``files`` (its decoder and resize), as (N, H, W, 3) uint8."""
    from imgclf.data.images import MAX_ASPECT, decode_image
    from imgclf.deploy.runtime import pixel_fn
    from imgclf.eval.inference import run_decode_policy

    policy, to_px = run_decode_policy(art, 40_000_000, MAX_ASPECT), pixel_fn(art)
    return np.stack([to_px(decode_image(Path(f).read_bytes(), f, policy)) for f in files])


def raw_throughput(pred, px: np.ndarray, seconds: float, batch: int = 32) -> dict:
    """Images/s of ``pred`` on batches of ``batch`` images cycling through ``px`` for ``seconds``."""
    batches = [px[i : i + batch] for i in range(0, len(px) - batch + 1, batch)]
    for b in batches[:3]:  # warm-up
        pred(b)
    load0, n, t0, cpu0 = _load(), 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        pred(batches[(n // batch) % len(batches)])
        n += batch
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"batch": batch, "img_per_s": round(n / wall, 1), "seconds": round(wall, 2),
            "cpu_ms_per_image": round(1000 * cpu / n, 3), "load": _load(load0)}  # fmt: skip


class Served:
    """``imgclf serve`` in a process of its own on 127.0.0.1 (port chosen by the OS); stopped with SIGTERM."""

    def __init__(self, run: str, runtime: str, extra: list[str], log_path: Path):
        ready = log_path.with_suffix(".ready.json")
        cmd = [sys.executable, "-m", "imgclf.cli", "serve", run, "--runtime", runtime, "--port", "0",
               "--ready-file", str(ready), *extra]  # fmt: skip
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while not ready.exists():
            if self.proc.poll() is not None or time.time() - t0 > 300:
                self.stop()
                raise SystemExit(f"the server did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        time.sleep(0.2)  # the file is written just before the loop waits
        self.port = json.loads(ready.read_text())["port"]

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far (every thread)."""
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> str:
        return _get(self.port, "/metrics").decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _get(port: int, path: str, body: bytes | None = None, ctype: str = "") -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST" if body is not None else "GET", path, body=body,
                     headers={"Content-Type": ctype} if ctype else {})  # fmt: skip
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise SystemExit(f"{path}: HTTP {r.status}: {data[:300]!r}")
        return data
    finally:
        conn.close()


def _load(before: tuple | None = None):
    """The machine's CPU counters now, or (with ``before``) what happened since: load average, busy cores."""
    stat = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    now = (time.time(), stat)
    if before is None:
        return now
    d = [b - a for a, b in zip(before[1], stat)]
    busy = (sum(d) - d[3] - d[4]) / os.sysconf("SC_CLK_TCK") / (now[0] - before[0])
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "busy_cores": round(busy, 2), "cores": os.cpu_count()}


def run_wrk(srv: Served, files: Path, connections: int, seconds: float, body: str, tmp: Path,
            close: bool = False) -> dict:  # fmt: skip
    """One wrk run against /predict (``close``: a new connection per request): answers per status, images/s
    answered 200, latency (ms) and who used the CPU meanwhile (server, wrk, the rest of the machine)."""
    out = tmp / "wrk.json"
    out.unlink(missing_ok=True)
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(LUA),
           f"http://127.0.0.1:{srv.port}/predict", "--", str(files), body, str(out),
           "close" if close else "keep"]  # fmt: skip
    ru0, cpu0, load0 = resource.getrusage(resource.RUSAGE_CHILDREN), srv.cpu_seconds(), _load()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0 or not out.exists():
        raise SystemExit(f"wrk failed ({r.returncode}): {r.stderr[-1000:]}")
    ru1, cpu1, load = resource.getrusage(resource.RUSAGE_CHILDREN), srv.cpu_seconds(), _load(load0)
    doc = json.loads(out.read_text())
    wall = doc["duration_us"] / 1e6
    ok = doc["status"].get("200", 0)
    wrk_cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / wall
    server_cpu = (cpu1 - cpu0) / wall
    load.update(server_cores=round(server_cpu, 2), wrk_cores=round(wrk_cpu, 2),
                others_cores=round(max(load["busy_cores"] - server_cpu - wrk_cpu, 0.0), 2))  # fmt: skip
    return {
        "connections": connections,
        "new_connection_per_request": close,
        "seconds": round(wall, 2),
        "status": doc["status"],
        "socket_errors": doc["socket_errors"],
        "ok_per_s": round(ok / wall, 1),
        "responses_per_s": round(doc["requests"] / wall, 1),
        "latency_ms": {k: round(v / 1000, 1) for k, v in doc["latency_us"].items()},
        "server_cpu_ms_per_response": round(1000 * (cpu1 - cpu0) / max(doc["requests"], 1), 3),
        "wrk_cpu_ms_per_response": round(1000 * wrk_cpu * wall / max(doc["requests"], 1), 3),
        "load": load,
        "totals": {
            "requests": doc["requests"],
            "server_cpu_s": cpu1 - cpu0,
            "wrk_cpu_s": wrk_cpu * wall,
            "busy_core_s": load["busy_cores"] * wall,
        },  # fmt: skip
    }


def merge(runs: list[dict]) -> dict:
    """One figure for the rounds of one case: totals over their time, p50/p90/mean the median of the rounds',
    p99/max the largest, the load averaged over the time."""
    secs = sum(r["seconds"] for r in runs)
    tot = {k: sum(r["totals"][k] for r in runs) for k in runs[0]["totals"]}
    status: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["status"].items():
            status[k] = status.get(k, 0) + v
        for k, v in r["socket_errors"].items():
            errors[k] = errors.get(k, 0) + v
    lat = {q: round(statistics.median(r["latency_ms"][q] for r in runs), 1) for q in ("p50", "p90", "mean")}
    lat.update({q: max(r["latency_ms"][q] for r in runs) for q in ("p99", "max")})
    server, wrk, busy = tot["server_cpu_s"] / secs, tot["wrk_cpu_s"] / secs, tot["busy_core_s"] / secs
    load = {"loadavg_1m": round(statistics.mean(r["load"]["loadavg_1m"] for r in runs), 2),
            "busy_cores": round(busy, 2), "server_cores": round(server, 2), "wrk_cores": round(wrk, 2),
            "others_cores": round(max(busy - server - wrk, 0.0), 2), "cores": os.cpu_count()}  # fmt: skip
    n = max(tot["requests"], 1)
    return {
        "connections": runs[0]["connections"],
        "new_connection_per_request": runs[0]["new_connection_per_request"],
        "rounds": len(runs),
        "seconds": round(secs, 2),
        "status": status,
        "socket_errors": errors,
        "ok_per_s": round(status.get("200", 0) / secs, 1),
        "ok_per_s_rounds": [r["ok_per_s"] for r in runs],
        "responses_per_s": round(tot["requests"] / secs, 1),
        "latency_ms": lat,
        "server_cpu_ms_per_response": round(1000 * tot["server_cpu_s"] / n, 3),
        "wrk_cpu_ms_per_response": round(1000 * tot["wrk_cpu_s"] / n, 3),
        "load": load,
    }


def batch_counts(srv: Served) -> tuple[float, float]:
    """(images, runtime calls) so far, from /metrics."""
    import re

    text = srv.metrics()
    s = sum(float(v) for v in re.findall(r"^imgclf_batch_size_sum\{[^}]*\} (\S+)", text, re.M))
    c = sum(float(v) for v in re.findall(r"^imgclf_batch_size_count\{[^}]*\} (\S+)", text, re.M))
    return s, c


def check_answers(srv: Served, files: list[str], pred) -> dict:
    """Each file posted once: top-1 agreement and largest probability difference with the local runtime."""
    probs = pred(pixels_of(files, pred.art))[1]
    names = pred.art.class_names
    agree, diff = 0, 0.0
    for f, p in zip(files, probs):
        ctype = "image/jpeg" if f.endswith(".jpg") else "image/png"
        top = json.loads(_get(srv.port, "/predict?top_k=1", Path(f).read_bytes(), ctype))["predictions"][0]["top"][0]
        agree += top["label"] == names[int(p.argmax())]
        diff = max(diff, abs(top["prob"] - float(p.max())))
    return {"n": len(files), "top1_agreement": round(agree / len(files), 4), "max_prob_diff": round(diff, 6)}


def serve_phase(a, lists: dict[str, Path], pred, px: np.ndarray, tmp: Path) -> tuple[dict, dict]:
    """The default server with ``a.connections`` clients: small PNGs and 224 px JPEGs, in ``a.rounds`` rounds that
    interleave them with the raw runtime (so all three see the same load). Returns (cases, raw)."""
    srv = Served(a.run, a.runtime, [], tmp / "serve.log")
    kinds, raw, runs, batches = ("png28", "jpeg224"), [], {"png28": [], "jpeg224": []}, {"png28": [], "jpeg224": []}
    try:
        for kind in kinds:
            run_wrk(srv, lists[kind], a.connections, a.warmup, a.body, tmp)  # warm-up, not recorded
        for _ in range(a.rounds):
            raw.append(raw_throughput(pred, px, a.raw_seconds / a.rounds))
            for kind in kinds:
                time.sleep(0.5)
                s0, c0 = batch_counts(srv)
                runs[kind].append(run_wrk(srv, lists[kind], a.connections, a.seconds / a.rounds, a.body, tmp))
                s1, c1 = batch_counts(srv)
                batches[kind].append((s1 - s0, c1 - c0))
        out = {}
        for kind in kinds:
            out[kind] = merge(runs[kind])
            images, calls = (sum(x) for x in zip(*batches[kind]))
            out[kind]["mean_batch"] = round(images / calls, 2) if calls else None
            out[kind]["answers"] = check_answers(srv, lists[kind].read_text().split()[: a.check], pred)
            _row(f"serve {kind}", out[kind])
    finally:
        srv.stop()
    secs = sum(r["seconds"] for r in raw)
    ref = {"batch": 32, "img_per_s": round(sum(r["img_per_s"] * r["seconds"] for r in raw) / secs, 1),
           "cpu_ms_per_image": round(statistics.mean(r["cpu_ms_per_image"] for r in raw), 3),
           "img_per_s_rounds": [r["img_per_s"] for r in raw], "seconds": round(secs, 2)}  # fmt: skip
    return out, ref


def overload_phase(a, lists: dict[str, Path], serve_ok: float, tmp: Path) -> dict:
    """``OVERLOAD`` limits: capacity (16 clients), then 64 and 160 clients that retry at once ignoring Retry-After,
    on keep-alive connections and with a new connection per request, interleaved in ``a.rounds`` rounds. Goodput
    is compared with the capacity of the same kind of clients and, more strictly, with the larger of that and the
    default server's ``serve_ok``."""
    srv = Served(a.run, a.runtime, [*OVERLOAD, *a.serve_args], tmp / "overload.log")
    phases = [("capacity", 16, False), ("hammer_64", 64, False), ("overload_10x", 160, False),
              ("capacity_new_connections", 16, True), ("overload_10x_new_connections", 160, True)]  # fmt: skip
    runs: dict[str, list] = {name: [] for name, _, _ in phases}
    try:
        run_wrk(srv, lists["png28"], 16, a.warmup, a.body, tmp)
        for _ in range(a.rounds):
            for name, conns, close in phases:
                time.sleep(0.5)
                runs[name].append(run_wrk(srv, lists["png28"], conns, a.seconds / a.rounds, a.body, tmp, close))
    finally:
        srv.stop()
    out = {name: merge(r) for name, r in runs.items()}
    for name, _, close in phases:
        _row(f"overload {name}", out[name])
        if not name.startswith("capacity"):
            cap = out["capacity_new_connections" if close else "capacity"]["ok_per_s"]
            r = out[name]
            r["goodput_vs_capacity"] = round(r["ok_per_s"] / cap, 3) if cap else None
            r["goodput_vs_best_capacity"] = round(r["ok_per_s"] / max(cap, serve_ok), 3) if cap else None
            r["responses_vs_capacity"] = round(r["responses_per_s"] / cap, 2) if cap else None
    return out


def _row(name: str, r: dict) -> None:
    lat, ld = r["latency_ms"], r["load"]
    print(f"{name:24s} {r['ok_per_s']:8.1f} ok/s {r['responses_per_s']:9.1f} resp/s  p50 {lat['p50']:6.1f}  "
          f"p99 {lat['p99']:6.1f} ms  status {r['status']}  load {ld['loadavg_1m']:.1f} "
          f"(server {ld['server_cores']:.2f}, wrk {ld['wrk_cores']:.2f}, others {ld['others_cores']:.2f} cores)",
          flush=True)  # fmt: skip


def summary(doc: dict) -> list[str]:
    """The README table: one row per wrk phase."""
    raw = doc["raw_batch32_img_per_s"]
    rows = ["| case | clients | img/s (200) | p50 ms | p99 ms | mean batch | vs raw batch-32 | goodput vs capacity "
            "(vs best) | others' load (cores) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    cases = [(f"serve {k}", v) for k, v in doc["serve"].items()] + [(f"overload {k}", v)
                                                                    for k, v in doc["overload"].items()]  # fmt: skip
    for name, r in cases:
        g = "" if "goodput_vs_capacity" not in r else f"{r['goodput_vs_capacity']} ({r['goodput_vs_best_capacity']})"
        lat, new = r["latency_ms"], " new" if r["new_connection_per_request"] else ""
        others = r["load"]["others_cores"]
        cells = [name, f"{r['connections']}{new}", f"{r['ok_per_s']:.0f}", lat["p50"], lat["p99"],
                 r.get("mean_batch") or "", f"{r['ok_per_s'] / raw:.2f}", g, f"{others:.2f}"]  # fmt: skip
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--runtime", default="auto", help="for the server and the raw reference")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured time of every case (over all rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds interleaving the cases (the machine's load drifts)")
    ap.add_argument("--warmup", type=float, default=3.0, help="untimed wrk run before each server's phases")
    ap.add_argument("--raw-seconds", type=float, default=9.0, help="raw runtime time (over all rounds)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--body", choices=("raw", "multipart"), default="raw", help="one image as the body, or a file part")
    ap.add_argument("--images", type=int, default=256, help="distinct images the clients cycle through")
    ap.add_argument("--check", type=int, default=64, help="images whose answers are compared with the runtime's")
    ap.add_argument("--serve-args", nargs="*", default=[], help="extra flags for the overload server")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    from imgclf.deploy.runtime import auto_predictor, resolve_runtime

    a.runtime = resolve_runtime(a.runtime, a.run)
    pred = auto_predictor(a.run, a.runtime)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="serve_wrk.") as d:
        tmp = Path(d)
        lists = make_images(tmp / "images", a.images)
        px = pixels_of(lists["png28"].read_text().split(), pred.art)
        serve, raw = serve_phase(a, lists, pred, px, tmp)
        print(f"raw {pred.name} batch 32: {raw['img_per_s']:.0f} img/s (rounds {raw['img_per_s_rounds']})", flush=True)
        overload = overload_phase(a, lists, serve["png28"]["ok_per_s"], tmp)
    ref = raw["img_per_s"]
    for r in serve.values():
        r["vs_raw_batch32"] = round(r["ok_per_s"] / ref, 3)
    doc = {
        "run": a.run,
        "runtime": pred.name,
        "body": a.body,
        "command": "python bench/serve_wrk.py " + " ".join(sys.argv[1:]),
        "client": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0].strip(),
        "raw": raw,
        "raw_batch32_img_per_s": ref,
        "rounds": a.rounds,
        "serve": serve,
        "overload": overload,
        "overload_args": [*OVERLOAD, *a.serve_args],
        "machine": machine(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": round(time.time() - t_start, 1),
    }
    doc["summary"] = summary(doc)
    write_json(a.out, doc)
    print("\n".join(doc["summary"]))
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
