"""Print the README's deployment tables (markdown) from the JSON results in bench/results/.

Usage: python bench/readme_tables.py [runtimes_embedded | runtimes_timm | serve_load | all]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def runtimes_embedded() -> str:
    res = _load("runtimes_embedded")
    rows = ["| runtime | batch | img/s | latency ms (median) | vs torch eager fp32 |", "|---|---|---|---|---|"]
    for r in res["results"]:
        rows.append(f"| {r['runtime']} | {r['batch']} | {r['img_per_s']:.0f} | {r['latency_ms_median']:.1f} | "
                    f"{r['speedup']:.2f}x |")  # fmt: skip
    for rt, why in res.get("skipped", {}).items():
        rows.append(f"\n`{rt}` skipped: {why}")
    return "\n".join(rows)


def runtimes_timm() -> str:
    res = _load("runtimes_timm")["models"]
    runtimes = list(dict.fromkeys(r["runtime"] for m in res.values() for r in m["results"]))
    head = "| model (224 px) | batch | " + " | ".join(runtimes) + " |"
    rows = [head, "|---|---|" + "---|" * len(runtimes)]
    for arch, m in res.items():
        for b in sorted({r["batch"] for r in m["results"]}):
            by = {r["runtime"]: r["img_per_s"] for r in m["results"] if r["batch"] == b}
            rows.append(
                f"| {arch} | {b} | " + " | ".join(f"{by[rt]:.0f}" if rt in by else "-" for rt in runtimes) + " |"
            )
    return "\n".join(rows)


def serve_load() -> str:
    res = _load("serve_load")["by_runtime"]
    rows = [
        "| runtime | server | img/s | p50 ms | p90 ms | p99 ms | mean batch | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rt, doc in res.items():
        for r in doc["results"]:
            lat = r["latency_ms"]
            rows.append(f"| {rt} | {r['target']} | {r['img_per_s']:.0f} | {lat['p50']:.0f} | {lat['p90']:.0f} | "
                        f"{lat['p99']:.0f} | {r.get('mean_batch') or '-'} | {sum(r['errors'].values())} |")  # fmt: skip
        rows.append(f"| {rt} | **batching speed-up {doc['batching_speedup']}x, vs LitServe {doc['vs_litserve']}x** "
                    "| | | | | | |")  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    for name, fn in (("runtimes_embedded", runtimes_embedded), ("runtimes_timm", runtimes_timm),
                     ("serve_load", serve_load)):  # fmt: skip
        if which in (name, "all") and (RESULTS / f"{name}.json").is_file():
            print(f"<!-- {name} -->\n{fn()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
