"""Any timm architecture, checked end to end: train -> export -> predict on several runtimes, per architecture.

For each architecture (random weights: the check is about the pipeline, not accuracy; the hub weights need
a download this machine cannot do) on a generated 3-class folder, in separate processes so that a crash of
one architecture is recorded, not fatal:

1. ``imgclf train --epochs 1 --input-size 64`` (fixed-size models are built for 64 px; a model that cannot
   take 64 px is retried at its own size; MobileOne and FastViT train at their own size, where the oneDNN
   channels_last bug that ``models/guards.py`` works around used to abort the process);
2. ``imgclf export --format onnx openvino torchscript --data DATA``: each format's parity with PyTorch, as
   the relative logit error (largest ``max|exported - torch| / max|torch|`` over images) and top-1 agreement;
3. ``imgclf predict DATA`` on ``torch``, ``onnxruntime`` and ``openvino``: the top-1 answers of the exported
   runtimes against PyTorch's, and the largest probability difference.

An architecture passes when every stage runs, every format is within the parity tolerance
(``deploy.export.verification.PARITY_REL_TOL`` and ``PARITY_MIN_AGREEMENT``) and the runtimes agree with
PyTorch on every image. Writes bench/results/arch_sweep.json (resumable: architectures already in it are
skipped unless --again) and prints a Markdown table (the README's).

Usage: python bench/arch_sweep.py [--archs resnet18 ...] [--again] [--table]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from demo_seeds import machine
from PIL import Image

from imgclf.deploy.export.verification import PARITY_MIN_AGREEMENT, PARITY_REL_TOL
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "arch_sweep.json"
#: family -> architectures (the smallest of each family that timm ships)
FAMILIES = {
    "ResNet": ["resnet18"], "ConvNeXt": ["convnext_atto"], "EfficientNet": ["efficientnet_b0", "tf_efficientnet_lite0"],
    "MobileNetV3/V4": ["mobilenetv3_small_100", "mobilenetv4_conv_small"], "RegNet": ["regnetx_002"],
    "GhostNet": ["ghostnet_100"], "RepGhost": ["repghostnet_050"], "LCNet": ["lcnet_050"], "HGNetV2": ["hgnetv2_b0"],
    "HRNet": ["hrnet_w18_small"], "DLA": ["dla34"], "ReXNet": ["rexnet_100"], "InceptionNeXt": ["inception_next_atto"],
    "MambaOut": ["mambaout_femto"], "StarNet": ["starnet_s1"], "PoolFormer": ["poolformer_s12"],
    "ViT": ["vit_tiny_patch16_224"], "DeiT": ["deit_tiny_patch16_224"], "EVA-02": ["eva02_tiny_patch14_224"],
    "CaiT": ["cait_xxs24_224"], "ConViT": ["convit_tiny"], "TNT": ["tnt_s_patch16_224"], "CoaT": ["coat_lite_tiny"],
    "CrossViT": ["crossvit_tiny_240"], "DaViT": ["davit_tiny"], "FocalNet": ["focalnet_tiny_srf"],
    "GCViT": ["gcvit_xxtiny"], "LeViT": ["levit_128s"], "EfficientViT (MIT/MSRA)": ["efficientvit_m0"],
    "EfficientFormerV2": ["efficientformerv2_s0"], "EdgeNeXt": ["edgenext_xx_small"],
    "MobileViTv2": ["mobilevitv2_050"], "RepViT": ["repvit_m1"], "TinyViT": ["tiny_vit_5m_224"],
    "Swin / SwinV2": ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"], "MViTv2": ["mvitv2_tiny"],
    "PVTv2": ["pvt_v2_b0"], "PiT": ["pit_ti_224"], "Visformer": ["visformer_tiny"], "VOLO": ["volo_d1_224"],
    "XCiT": ["xcit_nano_12_p16_224"], "MLP-Mixer": ["mixer_s16_224"], "ResMLP": ["resmlp_12_224"],
    "ConvMixer": ["convmixer_768_32"], "Sequencer": ["sequencer2d_s"], "MobileOne": ["mobileone_s0"],
    "FastViT": ["fastvit_t8"], "MaxViT": ["maxvit_pico_rw_256", "maxvit_rmlp_pico_rw_256"], "NesT": ["nest_tiny"],
    "Twins": ["twins_svt_small"], "Hiera": ["hiera_tiny_224"],
}  # fmt: skip
FORMATS = ("onnx", "openvino", "torchscript")
RUNTIMES = ("torch", "onnxruntime", "openvino")
SIZE = 64
#: trained at their own input size: the oneDNN channels_last crash (models/guards.py) needs >= 96 px inputs
NATIVE_SIZE = ("mobileone_s0", "fastvit_t8")


def make_data(root: Path, per_class: int = 16, size: int = 48, seed: int = 0) -> Path:
    """3 classes of generated pictures: a coloured square on noise, one colour per class."""
    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 200, 60), (50, 80, 230)]
    for c, col in enumerate(colours):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            img[y : y + size // 2, x : x + size // 2] = col
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def _run(args: list[str], timeout: int = 1800) -> tuple[int, str, float]:
    """(exit code, the error line, seconds) of ``imgclf ARGS`` in its own process."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "imgclf.cli", *args], capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout} s", timeout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("imgclf: error:")]
    why = lines[-1].removeprefix("imgclf: error: ") if lines else (f"exit {r.returncode}" if r.returncode else "")
    return r.returncode, why, round(time.perf_counter() - t0, 1)


def _predictions(run: Path, data: Path, runtime: str, out: Path) -> tuple[dict | None, str]:
    code, why, _ = _run(["predict", str(run), str(data), "--runtime", runtime, "--format", "json", "--no-reject",
                         "--top-k", "3", "--no-progress", "-o", str(out)])  # fmt: skip
    if code:
        return None, why
    rows = json.loads(out.read_text())["predictions"]
    return {r["path"]: {t["label"]: t["prob"] for t in r["top"]} for r in rows}, ""


def sweep_one(arch: str, data: Path, tmp: Path) -> dict:
    rec: dict = {"arch": arch, "input_size": SIZE}
    train = ["train", "--data", str(data), "--model", arch, "--weights", "none", "--epochs", "1", "--batch-size", "8",
             "--output", str(tmp), "--name", arch, "--no-progress", "-q"]  # fmt: skip
    code, why, secs = _run(train if arch in NATIVE_SIZE else [*train, "--input-size", str(SIZE)])
    if code == 2 and "cannot take" in why:  # a fixed-size model that cannot be built for 64 px: its own size
        rec["at_64"] = why
        code, why, secs = _run(train)
    rec["train"] = {"ok": code == 0, "seconds": secs, **({"error": why} if code else {})}
    if code:
        return rec
    run = tmp / arch
    rec["input_size"] = json.loads((run / "imgclf.json").read_text())["preprocessing"]["input_size"][1]
    code, why, secs = _run(["export", str(run), "--format", *FORMATS, "--data", str(data), "--verify-n", "48"])
    record = (
        json.loads((run / "export" / "export.json").read_text()) if (run / "export" / "export.json").is_file() else {}
    )
    rec["export"] = {"seconds": secs, **({"error": why} if code else {})}
    for fmt in FORMATS:
        v = record.get(fmt, {}).get("verify")
        rec["export"][fmt] = (
            {"rel": v["max_rel_logit_diff"], "agreement": v["top1_agreement"],
             "ok": v["max_rel_logit_diff"] <= PARITY_REL_TOL and v["top1_agreement"] >= PARITY_MIN_AGREEMENT}
            if v else {"ok": False}
        )  # fmt: skip
    preds = {}
    for rt in RUNTIMES:
        preds[rt], why = _predictions(run, data, rt, tmp / f"{arch}-{rt}.json")
        rec.setdefault("predict", {})[rt] = {"ok": preds[rt] is not None, **({"error": why} if why else {})}
    ref = preds["torch"]
    for rt in RUNTIMES[1:]:
        got = preds[rt]
        if ref is None or got is None:
            continue
        top = [max(ref[p], key=ref[p].get) == max(got[p], key=got[p].get) for p in ref]
        diff = max(abs(ref[p][k] - got[p].get(k, 0.0)) for p in ref for k in ref[p])
        rec["predict"][rt].update(top1_agreement=sum(top) / len(top), max_prob_diff=diff)
    rec["ok"] = (
        rec["train"]["ok"] and all(rec["export"][f]["ok"] for f in FORMATS)
        and all(rec["predict"][rt]["ok"] for rt in RUNTIMES)
        and all(rec["predict"][rt].get("top1_agreement") == 1.0 for rt in RUNTIMES[1:])
    )  # fmt: skip
    return rec


def table(doc: dict) -> str:
    head = ("| family | architecture | px | train | onnx rel. err | openvino rel. err | torchscript | "
            "predict onnxruntime / openvino = torch | result |")  # fmt: skip
    lines = [head, "|" + "---|" * 9]
    family = {a: f for f, archs in FAMILIES.items() for a in archs}

    def rel(ex: dict, f: str) -> str:
        v = ex.get(f, {})
        return f"{v['rel']:.0e}" if "rel" in v else "fails"

    for arch, r in doc["archs"].items():
        ex, pr = r.get("export", {}), r.get("predict", {})

        agree = " / ".join(f"{100 * pr[rt]['top1_agreement']:.0f} %" if "top1_agreement" in pr.get(rt, {}) else "-"
                           for rt in RUNTIMES[1:])  # fmt: skip
        result = "ok" if r.get("ok") else (r.get("train", {}).get("error") or ex.get("error") or "see JSON")
        train = "ok" if r.get("train", {}).get("ok") else "fails"
        ts = "ok" if ex.get("torchscript", {}).get("ok") else "fails"
        lines.append(f"| {family.get(arch, '')} | `{arch}` | {r.get('input_size')} | {train} | {rel(ex, 'onnx')} | "
                     f"{rel(ex, 'openvino')} | {ts} | {agree} | {result} |")  # fmt: skip
    n_ok = sum(1 for r in doc["archs"].values() if r.get("ok"))
    return "\n".join(lines) + f"\n\n{n_ok} of {len(doc['archs'])} architectures pass every stage."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=[a for archs in FAMILIES.values() for a in archs])
    ap.add_argument("--again", action="store_true", help="re-run architectures already in the results")
    ap.add_argument("--table", action="store_true", help="only print the table of the stored results")
    a = ap.parse_args()
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    doc.update(machine=machine(), command="python bench/arch_sweep.py", date=time.strftime("%Y-%m-%d"))
    doc.setdefault("archs", {})
    if not a.table:
        with tempfile.TemporaryDirectory() as tmp:
            data = make_data(Path(tmp) / "data")
            for i, arch in enumerate(a.archs, 1):
                if arch in doc["archs"] and not a.again:
                    continue
                t0 = time.perf_counter()
                rec = sweep_one(arch, data, Path(tmp) / "runs")
                rec["seconds"] = round(time.perf_counter() - t0, 1)
                doc["archs"][arch] = rec
                write_json(RESULTS, doc)  # after every architecture: an interrupted sweep resumes
                print(f"[{i}/{len(a.archs)}] {arch}: {'ok' if rec.get('ok') else 'FAILED'} ({rec['seconds']} s)",
                      flush=True)  # fmt: skip
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
