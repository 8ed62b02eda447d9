"""``imgclf audit --html PAGE``: one self-contained page (thumbnails embedded as base64 PNG) with a section per
finding kind: summary, files, duplicates, label conflicts, leaks, label issues, outliers, balance, notes.
The house style of the run report (``eval.report``); each section shows ``max_listed`` rows, the JSON has all."""

from __future__ import annotations

import html
import io
import time
from pathlib import Path
from typing import Any

from PIL import Image

from ..io import write_text
from .audit import FILE_KINDS, Audit
from .report import CSS, _img, _section, _table

SECTIONS = ("summary", "files", "duplicates", "conflicts", "leaks", "label-issues", "outliers", "balance", "notes")
THUMB = 96
AUDIT_CSS = ".pair{display:flex;gap:6px}figure img.thumb{width:96px;height:96px}figure.small{width:96px}"


def thumbnail(audit: Audit, r: dict[str, Any]) -> str:
    """The referenced image (``{"split", "index"}``) as a small embedded PNG; a note when it cannot be read."""
    try:
        img = audit.splits[r["split"]].samples.load(r["index"])
    except Exception:  # noqa: BLE001 - unreadable files are findings, not report failures
        return '<span class="bad">unreadable</span>'
    img.thumbnail((THUMB, THUMB))
    if max(img.size) < THUMB:  # small images (28 px) upscaled with hard edges
        s = THUMB / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return _img(buf.getvalue(), r["path"], cls="thumb")


def _figure(audit: Audit, r: dict[str, Any], caption: str) -> str:
    name = html.escape(Path(r["path"]).name[:40])
    return (f'<figure class="small">{thumbnail(audit, r)}<figcaption>{html.escape(r["split"])}: {name}<br>'
            f"{html.escape(caption)}</figcaption></figure>")  # fmt: skip


def _pairs(audit: Audit, kind: str, n: int) -> str:
    pairs = audit.doc[kind]
    if not pairs:
        return '<p class="note">None found.</p>'
    items = []
    for p in pairs[:n]:
        cos = "" if p["cosine"] is None else f", cos {p['cosine']:.3f}"
        head = f"{p['match']}: Hamming {p['phash_distance']}{cos}"
        figs = _figure(audit, p["a"], p["a"]["label"]) + _figure(audit, p["b"], p["b"]["label"])
        items.append(f'<div><p class="note">{html.escape(head)}</p><div class="pair">{figs}</div></div>')
    more = f'<p class="note">{len(pairs) - n} more in the JSON.</p>' if len(pairs) > n else ""
    return f'<div class="gallery">{"".join(items)}</div>{more}'


def _listing(audit: Audit, rows: list[dict[str, Any]], caption, n: int) -> str:
    if not rows:
        return '<p class="note">None found.</p>'
    figs = "".join(_figure(audit, r, caption(r)) for r in rows[:n])
    more = f'<p class="note">{len(rows) - n} more in the JSON.</p>' if len(rows) > n else ""
    return f'<div class="gallery">{figs}</div>{more}'


def _summary(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    cards = [(k.replace("_", " "), v) for k, v in s.items() if v or k in ("label_issues", "leaks_exact")]
    body = "".join(f'<div class="card"><b>{v}</b><span>{html.escape(k)}</span></div>' for k, v in cards)
    rows = [[n, d["n"], d["readable"], doc["data"][n]] for n, d in doc["splits"].items()]
    probe = doc.get("probe") or {}
    note = (f'<p class="note">Label issues from a {probe["folds"]}-fold probe, out-of-fold accuracy '
            f'{100 * probe["oof_accuracy"]:.2f} %.</p>') if "oof_accuracy" in probe else ""  # fmt: skip
    return f'<div class="cards">{body}</div>' + _table(["split", "images", "readable", "source"], rows) + note


def _balance(doc: dict[str, Any]) -> str:
    parts = []
    for name, b in doc["balance"].items():
        ratio = "–" if b["imbalance_ratio"] is None else f"{b['imbalance_ratio']:.2f}"
        low = ", ".join(b["below_min"]) or "none"
        parts.append(f'<p class="note">{html.escape(name)}: imbalance ratio {ratio}; under the minimum: '
                     f"{html.escape(low)}</p>")  # fmt: skip
    classes = doc["class_names"]
    rows = [[c, *[doc["balance"][n]["counts"].get(c, 0) for n in doc["balance"]]] for c in classes]
    return "".join(parts) + _table(["class", *doc["balance"]], rows)


def audit_html(audit: Audit) -> str:
    """The audit page as one HTML string."""
    doc, n = audit.doc, audit.cfg.max_listed
    files = {k: [f for f in doc["files"] if f["kind"] == k] for k in FILE_KINDS}
    file_body = "".join(f"<h3>{k.replace('_', ' ')} ({len(v)})</h3>" + _listing(audit, v, lambda r: r["detail"], n)
                        for k, v in files.items() if v) or '<p class="note">No file problems found.</p>'  # fmt: skip
    issue_cap = lambda r: f"{r['label']} → {r['suggested']} (quality {r['quality']:.3f})"  # noqa: E731
    parts = [
        _section("summary", "Summary", _summary(doc)),
        _section("files", "Files", file_body),
        _section("duplicates", "Duplicates (one split, one label)", _pairs(audit, "duplicates", n)),
        _section("conflicts", "Label conflicts (the same picture under two labels)", _pairs(audit, "conflicts", n)),
        _section("leaks", "Leaks across train / val / test", _pairs(audit, "leaks", n)),
        _section(
            "label-issues",
            "Suspected label errors (given → suggested)",
            _listing(audit, doc["label_issues"], issue_cap, n),
        ),  # fmt: skip
        _section(
            "outliers",
            "Outliers (far from their nearest neighbours)",
            _listing(audit, doc["outliers"], lambda r: f"{r['label']} (distance {r['score']:.3f})", n),
        ),
        _section("balance", "Class balance", _balance(doc)),
        _section(
            "notes",
            "Notes and settings",
            "".join(f'<p class="note">{html.escape(x)}</p>' for x in doc["notes"])
            + f"<pre>{html.escape(repr(doc['settings']))}</pre>",
        ),  # fmt: skip
    ]
    nav = "".join(f'<a href="#{s}">{s.replace("-", " ")}</a>' for s in SECTIONS)
    title = f"imgclf audit: {doc['data']['train']}"
    sub = f"{sum(d['n'] for d in doc['splits'].values())} images · {time.strftime('%Y-%m-%d')}"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}{AUDIT_CSS}</style></head><body><header><h1>{html.escape(title)}</h1><p>{html.escape(sub)}"
            f"</p></header><nav>{nav}</nav><main>{''.join(parts)}</main></body></html>")  # fmt: skip


def write_audit_html(audit: Audit, path: str | Path) -> Path:
    """Write the audit page atomically; returns its path."""
    write_text(path, audit_html(audit))
    return Path(path)
