"""Everything the command line prints: aligned tables, the per-verb summaries, prediction listings
(table / CSV / JSON), skipped-file lists and the logging handler that keeps log lines off progress bars.
The library returns dicts; only this module turns them into text."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ImgclfError

SUMMARY_KEYS = ("top1", "top5", "macro_f1", "balanced_accuracy", "loss", "n")

# --------------------------------------------------------------------------- primitives


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]

    def line(r: list[Any]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def pct(x: float | None) -> str:
    """``0.9123`` -> ``91.23 %``; None -> ``-``."""
    return "-" if x is None else f"{100 * x:.2f} %"


def print_skipped(skipped: dict[str, str]) -> None:
    """The unreadable files a command skipped, with the reason, on stderr."""
    if skipped:
        print(f"\nskipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for path, why in sorted(skipped.items()):
            print(f"  {path}: {why}", file=sys.stderr)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(quiet: bool) -> None:
    """``imgclf`` log records as plain lines on stderr, written around tqdm bars; ``quiet``: warnings only."""
    logger = logging.getLogger("imgclf")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


# --------------------------------------------------------------------------- metrics


ML_SUMMARY_KEYS = ("map", "map_micro", "micro_f1", "macro_f1", "samples_f1", "exact_match", "hamming_loss", "lrap",
                   "precision@1", "recall@1", "precision@3", "recall@3", "loss", "n")  # fmt: skip


def metrics_table(m: dict[str, Any], title: str = "") -> str:
    """The summary and per-class tables of a metrics dict (``train.metrics.compute_metrics`` or, multi-label,
    ``multilabel_metrics``)."""
    if m.get("multi_label"):
        return _multilabel_tables(m, title)
    rows = []
    for key in SUMMARY_KEYS:
        if key in m:
            v = m[key]
            rows.append([key, str(v) if key == "n" else (f"{v:.4f}" if key == "loss" else pct(v))])
    parts = [title] if title else []
    parts.append(format_table(rows, ["metric", "value"]))
    if "per_class" in m:
        pc = [[name, f"{100 * d['precision']:.2f}", f"{100 * d['recall']:.2f}", f"{100 * d['f1']:.2f}",
               str(d["support"])] for name, d in m["per_class"].items()]  # fmt: skip
        parts.append(format_table(pc, ["class", "precision %", "recall %", "f1 %", "support"]))
    return "\n\n".join(parts)


def _multilabel_tables(m: dict[str, Any], title: str) -> str:
    """Summary, decision-rule comparison and per-class (support, AP, precision, recall, F1, threshold) tables."""
    rows = []
    for key in ML_SUMMARY_KEYS:
        if key in m and m[key] is not None:
            v = m[key]
            rows.append([key, str(v) if key == "n" else (f"{v:.4f}" if key in ("loss", "hamming_loss") else pct(v))])
    parts = [title] if title else []
    parts.append(format_table(rows, ["metric", "value"]))
    d = m.get("decision") or {}
    th = d.get("thresholds", 0.5)
    if m.get("alternatives"):
        rule = "top-k" if d.get("rule") == "top_k" else f"thresholds ({d.get('objective', 'fixed')})"
        alt = [[rule, pct(m["micro_f1"]), pct(m["macro_f1"]), pct(m["samples_f1"]), pct(m["exact_match"]),
                f"{m['hamming_loss']:.4f}"]]  # fmt: skip
        for name, a in m["alternatives"].items():
            alt.append([name.replace("_", " "), pct(a["micro_f1"]), pct(a["macro_f1"]), pct(a["samples_f1"]),
                        pct(a["exact_match"]), f"{a['hamming_loss']:.4f}"])  # fmt: skip
        parts.append(format_table(alt, ["decision rule", "micro F1", "macro F1", "samples F1", "exact match",
                                        "Hamming loss"]))  # fmt: skip
    if "per_class" in m:
        pc = []
        for i, (name, c) in enumerate(m["per_class"].items()):
            t = th[i] if isinstance(th, list) else th
            pc.append([name, str(c["support"]), "-" if c["ap"] is None else f"{100 * c['ap']:.2f}",
                       f"{100 * c['precision']:.2f}", f"{100 * c['recall']:.2f}", f"{100 * c['f1']:.2f}",
                       "top-k" if d.get("rule") == "top_k" else f"{t:.3f}"])  # fmt: skip
        parts.append(format_table(pc, ["class", "support", "AP %", "precision %", "recall %", "f1 %", "threshold"]))
    return "\n\n".join(parts)


def confusion_table(m: dict[str, Any], class_names: list[str]) -> str:
    """The confusion matrix as text: rows = true class, columns = predicted class index."""
    cm = m.get("confusion_matrix")
    if not cm:
        return ""
    header = ["true \\ pred", *[str(i) for i in range(len(class_names))]]
    rows = [[f"{i} {name}"[:24], *[str(v) for v in row]] for i, (name, row) in enumerate(zip(class_names, cm))]
    return format_table(rows, header)


def print_train(result: Any) -> None:
    """``api.train``'s ``TrainResult``: validation and test tables, skipped files, the run directory."""
    print(metrics_table(result.val_metrics, f"validation (best epoch {result.best_epoch})"))
    if result.test_metrics is not None:
        print()
        print(metrics_table(result.test_metrics, "test"))
    print_skipped(result.skipped)
    if result.extra.get("teachers"):
        print_teachers(result)
    print(f"\nrun: {result.run_dir}  ({result.seconds / 60:.1f} min)")


def print_pretrain(res: Any) -> None:
    """``api.pretrain``'s ``PretrainResult``: one row per epoch, time and memory, how to use the backbone."""
    rows = [[r["epoch"], f"{r['train_loss']:.4f}", f"{r['emb_spread']:.3f}" if "emb_spread" in r else "-",
             pct(r.get("knn_top1")), f"{r['img_per_s']:.0f}"] for r in res.history]  # fmt: skip
    print(format_table(rows, ["epoch", "loss", "spread", "k-NN top-1", "img/s"]))
    print(
        f"\n{res.method} {res.arch}: {res.seconds / 60:.1f} min, peak memory {res.peak_rss_mb:.0f} MiB "
        f"(data-loader workers: {res.peak_worker_rss_mb:.0f} MiB each at most)"
    )
    if res.collapsed:
        print("WARNING: the representation collapsed (embedding spread below ssl.collapse_std); see metrics.csv")
    print_skipped(res.skipped)
    print(
        f"backbone: {res.run_dir}\n  use it: imgclf train DATA --model {res.arch} --weights {res.run_dir} "
        "[--strategy probe]"
    )


def print_shift(doc: dict[str, Any], run: str) -> None:
    """``api.evaluate_shift``: top-1 per corruption and severity, the means, ECE and OOD rejection under shift."""
    sev = sorted({r["severity"] for r in doc["rows"]})
    rows = []
    for name, per in doc["per_corruption"].items():
        acc = {r["severity"]: r["top1"] for r in doc["rows"] if r["corruption"] == name}
        rows.append([name, *[pct(acc.get(s)) for s in sev], pct(per["top1"]), pct(per.get("ece")),
                     pct(per.get("rejected"))])  # fmt: skip
    print(format_table(rows, ["corruption", *[f"sev {s}" for s in sev], "mean", "ECE", "rejected"]))
    c = doc["clean"]
    rej = f", rejected {pct(c['rejected'])}" if c.get("rejected") is not None else ""
    print(f"\nclean top-1 {pct(c['top1'])} (ECE {pct(c['ece'])}{rej}) on {doc['n']} images of {doc['data']}")
    drop = f", relative drop {pct(doc['relative_drop'])}" if doc.get("relative_drop") is not None else ""
    print(f"mean corruption accuracy (mCA) {pct(doc['mca'])}{drop}; mean ECE under shift {pct(doc['mean_ece'])}")
    print(f"written: {Path(run) / 'robustness.json'} (the report's robustness section)")


def print_teachers(result: Any) -> None:
    """Student vs each teacher (distillation): the main metric on validation and test images, parameters."""
    key = "map" if "map" in result.val_metrics else "top1"
    rows = [[f"teacher {t['run']} ({t['arch']})", f"{t['params'] / 1e6:.2f} M", pct(t["val"].get(key)),
             pct((t.get("test") or {}).get(key))] for t in result.extra["teachers"]]  # fmt: skip
    rows.append(["student (this run)", "", pct(result.val_metrics.get(key)), pct((result.test_metrics or {}).get(key))])
    print("\ndistillation\n" + format_table(rows, ["model", "parameters", f"val {key}", f"test {key}"]))


def print_rebalance(result: Any) -> None:
    """``api.rebalance``'s ``TrainResult``: what was chosen, validation before/after, the new run's tables."""
    r = result.val_metrics
    info = result.extra.get("rebalance", {})
    print_train(result)
    if info:
        chosen = f"tau {info['tau']}" if "tau" in info else f"L2 {info['wd']:g}"
        b = info["val_before"]
        print(f"{info['method']} ({chosen}, picked by validation balanced accuracy): validation balanced accuracy "
              f"{pct(b.get('balanced_accuracy'))} -> {pct(r.get('balanced_accuracy'))}, top-1 {pct(b.get('top1'))} "
              f"-> {pct(r.get('top1'))}")  # fmt: skip


def print_lr_find(res: dict[str, Any], js: Path, png: Path) -> None:
    print(
        f"suggested lr {res['suggested_lr']:.3g} (steepest fall of the loss); minimum loss at {res['min_loss_lr']:.3g}"
    )
    print(f"{res['steps_run']} steps in {res['seconds']}s; plot {png}, data {js}")


def print_eval(m: dict[str, Any], run: str, class_names: list[str], tta: str | None) -> None:
    """One run's metrics (``api.evaluate``): tables, calibration, OOD detection, confusion matrix, skipped."""
    pri = f" (priors {m['priors']['spec']})" if m.get("priors") else ""
    print(metrics_table(m, f"{run} on {m['data']}" + (f" (TTA {tta})" if tta else "") + pri))
    if "calibration" in m:  # the metrics dict's calibration entry (ECE/NLL before and after), not the artifact's
        c = m["calibration"]
        t = c["temperature"]
        what = f"T = {t:.3f}" if isinstance(t, float) else f"per class, T {min(t):.2f}-{max(t):.2f}"
        print(f"\ncalibration ({what}): ECE {pct(c['before']['ece'])} -> {pct(c['after']['ece'])}, "
              f"NLL {c['before']['nll']:.4f} -> {c['after']['nll']:.4f}")  # fmt: skip
    if "ood" in m:
        o = m["ood"]
        rows = [[k, f"{v['auroc']:.4f}", f"{v['aupr']:.4f}", pct(v["fpr_at_95_tpr"]),
                 pct(o["rejected"].get(k, {}).get("in")), pct(o["rejected"].get(k, {}).get("ood"))]
                for k, v in o["metrics"].items()]  # fmt: skip
        print(f"\nout-of-distribution: {o['data']} ({o['n']} images)")
        print(format_table(rows, ["score", "AUROC", "AUPR", "FPR@95%TPR", "in rejected", "OOD rejected"]))
    if m.get("confusion_matrix"):
        print("\nconfusion matrix (rows: true, columns: predicted class index)")
        print(confusion_table(m, class_names))
    print_skipped(m.get("skipped_files", {}))


def print_ensemble(rep: dict[str, Any]) -> None:
    """``api.evaluate_ensemble``: each calibrated member, the ensemble and its gain over the best member."""
    rows = [[Path(r).name, pct(m["top1"]), f"{m['calibration']['nll']:.4f}", pct(m["calibration"]["ece"])]
            for r, m in rep["members"].items()]  # fmt: skip
    e = rep["ensemble"]
    rows.append([f"ensemble of {len(rep['members'])}", pct(e["top1"]), f"{e['calibration']['nll']:.4f}",
                 pct(e["calibration"]["ece"])])  # fmt: skip
    print(format_table(rows, ["model (calibrated)", "top-1", "NLL", "ECE"]))
    g = rep["gain"]
    print(f"\ngain over the best member: top-1 {g['top1_points']:+.2f} points, NLL {-g['nll']:+.4f}")


def print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2))


def print_calibrate(run: str, r: dict[str, Any]) -> None:
    if "method" in r:  # multi-label: per-class calibration and thresholds
        n = len(r["temperature"]) if isinstance(r["temperature"], list) else 1
        print(f"{run}: {r['method']} scaling of {n} classes re-fitted on {r['data']} ({r['n']} images); ECE "
              f"{pct(r['before']['ece'])} -> {pct(r['after']['ece'])}, NLL {r['before']['nll']:.4f} -> "
              f"{r['after']['nll']:.4f}; decision thresholds re-tuned")  # fmt: skip
        for note in (r.get("thresholds") or {}).get("notes", []):
            print(f"  note: {note}")
        return
    print(f"{run}: temperature {r['previous_temperature']:.3f} -> {r['temperature']:.3f} on {r['data']} "
          f"({r['n']} images); ECE {pct(r['before']['ece'])} -> {pct(r['after']['ece'])}, "
          f"NLL {r['before']['nll']:.4f} -> {r['after']['nll']:.4f}")  # fmt: skip
    if r.get("priors"):
        d = r["decisions"]
        print(f"priors {r['priors']['spec']} stored (export and serve apply them): on {r['data']}, top-1 "
              f"{pct(d['without_priors']['top1'])} -> {pct(d['with_priors']['top1'])}, balanced accuracy "
              f"{pct(d['without_priors']['balanced_accuracy'])} -> {pct(d['with_priors']['balanced_accuracy'])} "
              "(the data's own class mix, not the deployment's)")  # fmt: skip


# --------------------------------------------------------------------------- predictions


def render_predictions(preds: Any, fmt: str) -> str:
    """``api.predict``'s ``Predictions`` as ``table`` (aligned text), ``csv`` (path,label_1,prob_1,...) or
    ``json``; with OOD judgement, the answer (a label or ``unknown``) and the score come first. Multi-label
    predictions put the label set first (``labels``: names joined by ``|``, ``(none)`` in tables for the empty
    set; ``probs``: their probabilities), then the top-k labels."""
    if fmt == "json":
        doc = {"predictions": preds.rows, "skipped": [{"path": p, "reason": r} for p, r in preds.skipped.items()]}
        return json.dumps(doc, indent=2)
    if getattr(preds, "multi_label", False):
        return _render_label_sets(preds, fmt)
    k = max((len(r["top"]) for r in preds.rows), default=0)
    judged = any("unknown" in r for r in preds.rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        extra = ["label", "unknown", "ood_score"] if judged else []
        w.writerow(["path", *extra, *[h for j in range(1, k + 1) for h in (f"label_{j}", f"prob_{j}")]])
        for r in preds.rows:
            ex = [r.get("label"), r.get("unknown"), r.get("ood_score", "")] if judged else []
            w.writerow([r["path"], *ex, *[v for t in r["top"] for v in (t["label"], f"{t['prob']:.6f}")]])
        return buf.getvalue()
    if fmt == "table":

        def first(r: dict) -> list[str]:
            if not judged:
                return []
            return ["unknown" if r.get("unknown") else r["label"], f"{r['ood_score']:.3g}" if "ood_score" in r else ""]

        body = [[r["path"], *first(r), *[f"{t['label']} {100 * t['prob']:.1f}%" for t in r["top"]]] for r in preds.rows]
        head = ["path", *(["answer", "ood score"] if judged else []), *[f"top{j}" for j in range(1, k + 1)]]
        return format_table(body, head)
    raise ImgclfError(f"--format must be table, csv or json (got {fmt!r})")


def _render_label_sets(preds: Any, fmt: str) -> str:
    k = max((len(r["top"]) for r in preds.rows), default=0)
    judged = any("unknown" in r for r in preds.rows)

    def answer(r: dict, table: bool) -> str:
        if r.get("unknown") and table:
            return "unknown"  # (CSV: an empty set, the ``unknown`` column says why)
        names = [t["label"] for t in r["labels"]]
        return "|".join(names) if names or not table else "(none)"

    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        extra = ["unknown", "ood_score"] if judged else []
        w.writerow(["path", "labels", "probs", *extra,
                    *[h for j in range(1, k + 1) for h in (f"label_{j}", f"prob_{j}")]])  # fmt: skip
        for r in preds.rows:
            ex = [r.get("unknown"), r.get("ood_score", "")] if judged else []
            probs = "|".join(f"{t['prob']:.6f}" for t in r["labels"])
            w.writerow([r["path"], answer(r, False), probs, *ex,
                        *[v for t in r["top"] for v in (t["label"], f"{t['prob']:.6f}")]])  # fmt: skip
        return buf.getvalue()
    if fmt == "table":
        body = []
        for r in preds.rows:
            score = [f"{r['ood_score']:.3g}" if "ood_score" in r else ""] if judged else []
            shown = ", ".join(f"{t['label']} {100 * t['prob']:.1f}%" for t in r["labels"])
            body.append([r["path"], "unknown" if r.get("unknown") else shown or "(none)", *score,
                         *[f"{t['label']} {100 * t['prob']:.1f}%" for t in r["top"]]])  # fmt: skip
        head = ["path", "labels", *(["ood score"] if judged else []), *[f"top{j}" for j in range(1, k + 1)]]
        return format_table(body, head)
    raise ImgclfError(f"--format must be table, csv or json (got {fmt!r})")


# --------------------------------------------------------------------------- deployment


def print_exports(results: list[tuple[str, dict[str, Any]]]) -> None:
    """One row per exported format: path and its verification against PyTorch (multi-label runs: agreement and
    exact match of the label sets under the run's thresholds)."""
    rows, sets = [], False
    for fmt, r in results:
        v = r["verify"]
        if v.get("skipped"):  # a format whose runtime does not exist here (Core ML off Apple platforms)
            rows.append([fmt, r["path"], "not verified", "-", "-", "-", "-", 0])
            continue
        sets = sets or v.get("decision") == "label set"
        labelled = v.get("labelled", v["images"]) > 0  # generated pictures have no labels: no top-1 to show
        rows.append([fmt, r["path"], f"{v.get('max_rel_logit_diff', float('nan')):.1e}",
                     f"{v['max_abs_logit_diff']:.2e}", f"{100 * v['top1_agreement']:.2f} %",
                     f"{100 * v['top1_exported']:.2f} %" if labelled else "-",
                     f"{v['top1_drop_points']:+.2f}" if labelled else "-", v["images"]])  # fmt: skip
    what = ("label-set agreement", "exact match") if sets else ("top-1 agreement", "top-1")
    print(format_table(rows, ["format", "path", "rel. logit diff", "max |logit diff|", *what, "drop (points)",
                              "images"]))  # fmt: skip


def print_bench(res: dict[str, Any]) -> None:
    """``deploy.bench.bench_run``: throughput and latency per runtime and batch size, then what was skipped."""
    rows = [[r["runtime"], str(r["batch"]), f"{r['img_per_s']:.1f}", f"{r['latency_ms_median']:.2f}",
             f"{r['latency_ms_p90']:.2f}", f"{r['speedup']:.2f}x" if r["speedup"] else "-",
             pct(r["top1_agreement_with_first"])] for r in res["results"]]  # fmt: skip
    print(format_table(rows, ["runtime", "batch", "img/s", "latency ms (median)", "p90 ms", "vs first",
                              "top-1 = first"]))  # fmt: skip
    for rt, why in res["skipped"].items():
        print(f"skipped {rt}: {why}")


# --------------------------------------------------------------------------- few-shot and models


def print_index(run: Path, n: int, art: Any, built: bool) -> None:
    """A built or extended k-NN index."""
    if not built:
        print(f"{run}: {n} support images, {len(art.class_names)} classes")
        return
    loo = art.metrics.get("support_loo_top1")
    extra = f"; leave-one-out accuracy on the support set {100 * loo:.1f} %" if loo is not None else ""
    print(f"index {run}: {n} images, {len(art.class_names)} classes{extra}")
    print(f"use it like a trained run: imgclf predict {run} IMAGES")


def print_zeroshot(run: Path, art: Any) -> None:
    """A built or changed zero-shot run: classes, prompts per class, embedding size, cache, zero-shot top-1."""
    info, m = art.extra.get("zeroshot", {}), art.metrics
    names = art.class_names
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    print(f"zero-shot run {run}: open_clip {info.get('model')} ({info.get('pretrained')})")
    print(f"  classes ({len(names)}): {shown}")
    print(f"  prompts per class: {len(info.get('templates', []))}; embedding dim {info.get('embedding_dim')}; "
          f"input {'x'.join(map(str, art.preprocessing.size))}")  # fmt: skip
    tip = info.get("tip")
    if tip:
        n = sum(tip["n_support"].values())
        print(f"  Tip-Adapter cache: {n} support images (alpha {tip['alpha']:g}, beta {tip['beta']:g})")
    if m.get("zeroshot_top1") is not None:
        print(
            f"  zero-shot top-1 on {m.get('zeroshot_data')}: {pct(m['zeroshot_top1'])} ({m.get('zeroshot_n')} images)"
        )
    print(f"use it like a trained run: imgclf predict {run} IMAGES")


def print_episodes(rep: dict[str, Any], shots: list[int], episodes: int, queries: int) -> None:
    """``eval.fewshot.few_shot_report``: mean ± 95 % CI per mode and K."""
    rows = [[mode, *[f"{100 * r[str(s)]['mean']:.2f} ± {100 * r[str(s)]['ci95']:.2f}" for s in shots]]
            for mode, r in rep["results"].items()]  # fmt: skip
    ways = next(iter(rep["results"].values()))[str(shots[0])]["ways"]
    print(f"{ways}-way episode accuracy % (mean ± 95 % CI over {episodes} episodes, {queries} queries/class)")
    print(format_table(rows, ["mode", *[f"{s}-shot" for s in shots]]))
    print(f"{rep['model']} ({rep['weights']}) on {rep['n_images']} images of {rep['data']}")


def print_models(names: list[str], limit: int, hub: set[str], packaged: dict[str, bool], pip: dict[str, str]) -> None:
    """``imgclf models``: architectures and the weight sources each has."""
    shown = names if limit == 0 else names[:limit]
    rows = [[n, "installed" if packaged.get(n) else ("pip install " + pip[n] if n in packaged else "-"),
             "yes" if n in hub else "-"] for n in shown]  # fmt: skip
    print(format_table(rows, ["architecture", "packaged weights (offline)", "hub weights (online)"]))
    if len(shown) < len(names):
        print(f"... {len(names) - len(shown)} more (use --limit 0 to list all)")
    print(f"\n{len(names)} architecture(s) match. Weight sources for --weights:")
    print("  packaged  ImageNet weights shipped in PyPI packages: "
          + ", ".join(f"{a} ({'installed' if ok else 'not installed'})" for a, ok in packaged.items()))  # fmt: skip
    print("  FILE      a local .safetensors or .pth state dict (loaded with weights_only=True)")
    print("  hub       timm / Hugging Face pretrained download (needs internet)")
    print("  none      random initialisation")


def print_backbones(res: dict[str, Any]) -> None:
    """``backbones.benchmark_backbones``: one row per architecture (Pareto-optimal ones starred), the skipped ones,
    the choice for the latency budget, where the files are."""
    lat, thr = res["batch_sizes"]
    rows = []
    for r in sorted(res["rows"], key=lambda r: r["latency_ms"][lat]):
        acc = pct(r["probe_top1"]) if r["probe_top1"] is not None else "speed only"
        rows.append([r["arch"] + (" *" if r["arch"] in res["pareto"] else ""), r["weights"], r["input_size"],
                     f"{r['params_m']:.2f}", f"{r['gmacs']:.3g}", r["runtime"], f"{r['latency_ms'][lat]:.2f}",
                     f"{r['img_per_s'][thr]:.0f}", acc])  # fmt: skip
    print(format_table(rows, ["architecture", "weights", "size", "params M", "GMACs", "runtime",
                              f"ms b{lat}", f"img/s b{thr}", "probe top-1"]))  # fmt: skip
    if res["pareto"]:
        print("* on the Pareto front (no faster architecture is as accurate)")
    if any(r["probe_top1"] is None for r in res["rows"]):
        why = "no weights available offline (--hub downloads them)" if res["data"] else "no --data given"
        print(f"speed only: random weights ({why})")
    for arch, why in res["skipped"].items():
        print(f"skipped {arch}: {why}", file=sys.stderr)
    c = res.get("choice")
    if c:
        if c["arch"]:
            print(f"\nwithin {c['latency_ms']} ms at batch {lat}: {c['arch']} ({pct(c['probe_top1'])}, "
                  f"{c['latency_ms_measured']:.2f} ms)")  # fmt: skip
        else:
            print(f"\nwithin {c['latency_ms']} ms at batch {lat}: no choice ({c['why']}; fits: "
                  f"{', '.join(c['fits']) or 'none'})")  # fmt: skip
    print(f"results: {res['output']}/benchmark.json" + (f", plot: {res['plot']}" if res.get("plot") else ""))


# --------------------------------------------------------------------------- data conversion


def print_convert(res: dict[str, Any]) -> None:
    """The summary of ``imgclf convert``: shards written, samples, classes, size, images left out."""
    print(f"wrote {res['samples']} samples ({res['task'].replace('_', '-')}, {res['classes']} classes) in "
          f"{res['shards']} shard(s), {res['bytes'] / 1e6:.1f} MB of images, to {res['output']} "
          f"({res['seconds']:.1f} s)")  # fmt: skip
    skipped = res["skipped"]
    if skipped:
        first = next(iter(skipped))
        print(f"left out {len(skipped)} unreadable or non-image file(s), listed in dataset.json (e.g. {first}: "
              f"{skipped[first]})")  # fmt: skip


# --------------------------------------------------------------------------- data audit


def print_audit(doc: dict[str, Any], brief: bool = False) -> None:
    """``api.audit``'s report: the findings (first rows of each kind) unless ``brief``, then the summary table."""
    if not brief:
        _audit_details(doc)
    s = doc["summary"]
    rows = [[k.replace("_", " "), s[k]] for k in ("unreadable", "tiny", "aspect", "mode", "exif_rotated",
                                                  "extension")]  # fmt: skip
    for kind in ("duplicates", "conflicts", "leaks"):
        rows.append([f"{kind} (pairs)", f"{s[f'{kind}_exact']} exact, {s[f'{kind}_near']} near"])
    rows += [["label issues", s["label_issues"]], ["outliers", s["outliers"]],
             ["classes below min count", s["classes_below_min"]]]  # fmt: skip
    sizes = ", ".join(f"{n} {d['n']}" for n, d in doc["splits"].items())
    print(f"\naudit of {doc['data']['train']} ({sizes} images, {doc['seconds']:.0f} s)")
    print(format_table(rows, ["finding", "count"]))
    b = doc["balance"]["train"]
    ratio = "-" if b["imbalance_ratio"] is None else f"{b['imbalance_ratio']:.2f}"
    print(f"class balance (train): imbalance ratio {ratio}" + (f"; under the minimum: {', '.join(b['below_min'])}"
                                                              if b["below_min"] else ""))  # fmt: skip
    if doc.get("probe") and "oof_accuracy" in doc["probe"]:
        print(f"label issues: {doc['probe']['folds']}-fold probe, out-of-fold accuracy "
              f"{pct(doc['probe']['oof_accuracy'])}")  # fmt: skip
    for note in doc["notes"]:
        print(f"note: {note}")
    if "fix" in doc:
        f = doc["fix"]
        dropped = ", ".join(f"{k} {v}" for k, v in f["dropped"].items() if v) or "none"
        print(f"fix: {f['path']}: kept {f['kept']} of {f['of']} (dropped: {dropped}; relabelled {f['relabelled']})")


def _audit_details(doc: dict[str, Any], n: int = 10) -> None:
    if doc["files"]:
        rows = [[f["path"], f["kind"], f["detail"]] for f in doc["files"][:n]]
        print(format_table(rows, ["file", "finding", "detail"]))
        print()
    for kind in ("duplicates", "conflicts", "leaks"):
        pairs = doc[kind]
        if pairs:
            rows = [[p["a"]["path"], p["b"]["path"], p["match"], p["phash_distance"],
                     "-" if p["cosine"] is None else f"{p['cosine']:.3f}"] for p in pairs[:n]]  # fmt: skip
            print(f"{kind} ({len(pairs)} pairs{', first ' + str(n) if len(pairs) > n else ''})")
            print(format_table(rows, ["image", "same as", "match", "hamming", "cosine"]))
            print()
    if doc["label_issues"]:
        rows = [[r["path"], r["label"], r["suggested"], f"{r['quality']:.3f}"] for r in doc["label_issues"][:n]]
        print(f"suspected label errors ({len(doc['label_issues'])}, most likely first)")
        print(format_table(rows, ["image", "label", "suggested", "quality"]))


def print_compress(doc: dict[str, Any]) -> None:
    """``compress.compress``: teacher, student and int8 student (size, speed, accuracy), then the verdict."""
    rows, batches = [], list(doc["rows"][0]["img_per_s"])
    for r in doc["rows"]:
        rows.append([r["role"], r["arch"], r["runtime"], f"{r['params'] / 1e6:.2f} M", f"{r['size_mb']:.2f}",
                     *(f"{r['img_per_s'][b]:.0f}" for b in batches), pct(r["value"])])  # fmt: skip
    metric = {"top1": "top-1", "map": "mAP"}.get(doc["metric"], doc["metric"])
    print(f"on {doc['images']['n']} {doc['images']['split']} images ({doc['images']['name']}):")
    print(format_table(rows, ["model", "arch", "runtime", "params", "size MB", *(f"img/s b{b}" for b in batches),
                              metric]))  # fmt: skip
    v = doc["int8_vs_teacher"]
    speed = ", ".join(f"{s}x at batch {b}" for b, s in v["speedup"].items())
    scored = {r["scored_on"] for r in doc["rows"][:2]}
    verdict = ("within the budget" if doc["within_budget"] else
               "BEYOND the budget" + (" (kept: --force)" if doc.get("forced") else ""))  # fmt: skip
    print(
        f"({metric} of teacher and student on {', '.join(sorted(scored))}, of the int8 student on "
        f"{doc['rows'][2]['scored_on']}; img/s on the runtime named)"
    )
    d = v["drop_points"]
    change = f"loses {d:.2f}" if d >= 0 else f"gains {-d:.2f}"
    print(f"\nint8 student vs teacher: {v['size_ratio']}x smaller; img/s {speed}; {change} {metric} points "
          f"(--max-drop {doc['max_drop']}): {verdict}")  # fmt: skip
    print(f"student run: {doc['student']} (figures: compress.json)")


def gated(run: Callable[[], dict[str, Any]], printer: Callable[[dict[str, Any]], None], refused: type,
          json_out: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The figures of a command with a verdict (compress's budget, retrain's promotion), printed (and written to
    ``json_out``) whether the result is accepted or not: ``run()``'s document, or the ``doc`` of its ``refused``
    exception, which is raised again after them (its one line comes last)."""
    from ..io import write_json

    try:
        doc, error = run(), None
    except refused as e:
        doc, error = e.doc, e
    printer(doc)
    if json_out:
        write_json(json_out, doc)
    if error is not None:
        raise error
    return doc


def print_retrain(doc: dict[str, Any]) -> None:
    """``retrain.retrain``: champion and challenger on the two held-out sets, the training mix, then the decision."""
    metric = {"top1": "top-1", "map": "mAP"}.get(doc["metric"], doc["metric"])
    c, h, d = doc["scores"]["champion"], doc["scores"]["challenger"], doc["data"]
    rows = [[f"{s}: {d[s]['held_out_from']}", d[s]["held_out"], pct(c[s]), pct(h[s]),
             f"{100 * (h[s] - c[s]):+.2f}"] for s in ("new", "old")]  # fmt: skip
    print(f"champion {doc['champion']} vs challenger, {metric} on fixed held-out sets:")
    print(format_table(rows, ["held-out set", "images", "champion", "challenger", "points"]))
    r = d["replay"]
    print(f"challenger trained on {d['train']} images: {d['new']['train']} new + {r['images']} replayed old "
          f"({r['per_new_image']:g} per new image), {doc['epochs']} epochs at lr {doc['lr']:g}, "
          f"{doc['seconds'] / 60:.1f} min in all")  # fmt: skip
    dec, version = doc["decision"], doc.get("version")
    if not dec["promoted"]:
        verdict = "NOT PROMOTED"
    elif version:
        verdict = f"PROMOTED as version {version}" + (" (--force)" if dec["forced"] else "")
    else:
        verdict = ("BETTER" if dec["accepted"] else "NOT BETTER, kept (--force)") + " (no model repository: it stays"
        verdict += " where it trained)"
    print(f"\ndecision: {verdict}: {dec['reason']}")
    print(f"challenger run: {doc['run']} (figures: retrain.json)")
