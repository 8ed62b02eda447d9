"""``imgclf audit``: planted problems found exactly, flipped labels ranked first, ``--fix`` output, the user's files
untouched, the JSON schema and one-line errors."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data.audit import exact_groups, hamming_pairs
from imgclf.errors import ImgclfError
from imgclf.eval.audit import cosine_topk, require, stratified_folds

from .conftest import make_folder, make_image, run_cli

pytest.importorskip("cleanlab")
pytest.importorskip("imagehash")

FAST = ["--model", "test_efficientnet", "--weights", "none", "--input-size", "32", "--workers", "0", "--no-progress"]
DOC_KEYS = {"imgclf_audit", "data", "splits", "class_names", "settings", "summary", "files", "modes", "duplicates",
            "conflicts", "leaks", "label_issues", "probe", "outliers", "balance", "notes", "seconds"}  # fmt: skip


def digest(root: Path) -> dict[str, str]:
    """SHA-256 and mtime of every file under ``root``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-class train folder and a test folder with planted problems (names sort the copies after originals)."""
    root = tmp_path_factory.mktemp("audit")
    train = make_folder(root / "train", n_per_class=10, classes=3)
    test = make_folder(root / "test", n_per_class=3, classes=3, seed=5)
    c0, c1, c2 = (train / f"class_{k}" for k in range(3))
    shutil.copy(c0 / "img_000.png", c0 / "zz_copy.png")  # exact duplicate, same bytes
    Image.open(c0 / "img_001.png").save(c0 / "zz_lossless.bmp")  # exact duplicate, other format
    shutil.copy(c0 / "img_002.png", c1 / "zz_conflict.png")  # the same picture under two labels
    shutil.copy(c2 / "img_003.png", test / "class_2" / "zz_leak.png")  # train/test leak
    (c2 / "zz_empty.png").write_bytes(b"")  # zero-byte
    (c2 / "zz_truncated.png").write_bytes((c2 / "img_004.png").read_bytes()[:60])  # corrupt
    rng = np.random.default_rng(9)
    make_image(1, rng).save(c1 / "zz_really_png.jpg", format="PNG")  # extension mismatch
    rgba = make_image(1, rng).convert("RGBA")
    rgba.save(c1 / "zz_alpha.png")  # alpha channel
    img = make_image(2, rng)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(c2 / "zz_rotated.jpg", exif=exif, quality=95)  # EXIF orientation
    return train, test


def _pairs(doc: dict, kind: str, match: str | None = None) -> set[tuple[str, str]]:
    return {(Path(p["a"]["path"]).name, Path(p["b"]["path"]).name) for p in doc[kind]
            if match is None or p["match"] == match}  # fmt: skip


@pytest.mark.cli
def test_audit_finds_the_planted_problems_exactly_and_fixes_without_touching_files(planted, tmp_path):
    train, test = planted
    before = digest(train.parent)
    out = tmp_path / "out"
    flags = ["--cosine", "1.1", "--joint-cosine", "1.1", "--fix-labels", "keep", "--cache-dir", tmp_path / "c", *FAST]
    r = run_cli("audit", train, "--test-data", test, "--json", out / "a.json", "--html", out / "a.html", "--fix",
                out / "fixed.csv", *flags)  # fmt: skip
    assert r.code == 0, r
    assert digest(train.parent) == before  # nothing written, moved or touched
    doc = json.loads((out / "a.json").read_text())
    assert set(doc) == DOC_KEYS | {"fix"}
    assert _pairs(doc, "duplicates") == {("img_000.png", "zz_copy.png"), ("img_001.png", "zz_lossless.bmp")}
    assert _pairs(doc, "conflicts") == {("img_002.png", "zz_conflict.png")}
    assert _pairs(doc, "leaks") == {("img_003.png", "zz_leak.png")}
    assert {p["match"] for k in ("duplicates", "conflicts", "leaks") for p in doc[k]} == {"exact"}
    files = {(f["kind"], Path(f["path"]).name) for f in doc["files"]}
    assert files == {("unreadable", "zz_empty.png"), ("unreadable", "zz_truncated.png"),
                     ("extension", "zz_really_png.jpg"), ("mode", "zz_alpha.png"),
                     ("exif_rotated", "zz_rotated.jpg")}  # fmt: skip
    assert doc["splits"]["train"] == {"n": 38, "readable": 36, "multi_label": False}
    assert doc["balance"]["train"]["counts"] == {"class_0": 12, "class_1": 13, "class_2": 13}
    assert doc["balance"]["train"]["imbalance_ratio"] == pytest.approx(13 / 12, abs=1e-4)
    # the cleaned list: unreadable, the later copy of each duplicate, both conflict images, the leaked image gone
    gone = {"zz_empty.png", "zz_truncated.png", "zz_copy.png", "zz_lossless.bmp", "zz_conflict.png"}
    gone_at = {("class_0", "img_002.png"), ("class_2", "img_003.png")}
    with open(out / "fixed.csv", newline="") as f:
        rows = list(csv.reader(f))
    want = [[str(p.resolve()), p.parent.name] for p in sorted(train.rglob("*.*"), key=lambda q: q.parts)
            if p.name not in gone and (p.parent.name, p.name) not in gone_at]  # fmt: skip
    assert rows[0] == ["path", "label"] and sorted(rows[1:]) == sorted(want)
    assert doc["fix"]["dropped"] == {"unreadable": 2, "duplicates": 2, "conflicts": 2, "leaks": 1,
                                     "label_dropped": 0}  # fmt: skip
    page = (out / "a.html").read_text()
    assert page.count("data:image/png;base64") >= 8 and 'id="leaks"' in page
    # the cleaned list trains: imgclf reads it as data
    assert run_cli("audit", out / "fixed.csv", "--no-embeddings", "--cache-dir", tmp_path / "c", *FAST).code == 0


@pytest.mark.cli
def test_near_duplicates_by_perceptual_hash(tmp_path):
    train = make_folder(tmp_path / "d", n_per_class=6, classes=2)
    img = Image.open(train / "class_1" / "img_002.png")
    img.resize((32, 32), Image.BICUBIC).convert("RGB").save(train / "class_1" / "zz_resized.jpg", quality=95)
    flags = ["--no-embeddings", "--phash-distance", "6", "--cache-dir", tmp_path / "c", *FAST]
    r = run_cli("audit", train, "--json", tmp_path / "a.json", *flags)
    assert r.code == 0, r
    doc = json.loads((tmp_path / "a.json").read_text())
    assert _pairs(doc, "duplicates", "near") == {("img_002.png", "zz_resized.jpg")}
    assert doc["label_issues"] == [] and any("--no-embeddings" in n for n in doc["notes"])


@pytest.mark.slow
@pytest.mark.cli
def test_flipped_labels_rank_first_on_separable_data(tmp_path):
    """Four flipped labels in 96 easily separable images are the top 4 suspected errors (packaged Lite0)."""
    rng = np.random.default_rng(3)
    lines, flipped = ["path,label"], set()
    (tmp_path / "img").mkdir()
    for i in range(96):
        c = i % 4
        make_image(c, rng).save(tmp_path / "img" / f"{i:03d}.png")
        given = (c + 1) % 4 if i in (5, 30, 51, 88) else c
        if given != c:
            flipped.add(f"{i:03d}.png")
        lines.append(f"img/{i:03d}.png,c{given}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    r = run_cli("audit", tmp_path / "labels.csv", "--weights", "packaged", "--input-size", "64", "--workers", "0",
                "--no-progress", "--json", tmp_path / "a.json", "--cache-dir", tmp_path / "c")  # fmt: skip
    assert r.code == 0, r
    doc = json.loads((tmp_path / "a.json").read_text())
    top = {Path(x["path"]).name for x in doc["label_issues"][:4]}
    assert top == flipped
    assert all(x["suggested"] != x["label"] for x in doc["label_issues"][:4])


@pytest.mark.cli
def test_fix_refuses_inputs_and_arrays_write_npz(tmp_path):
    data = make_folder(tmp_path / "d", n_per_class=4, classes=2)
    victim = data / "class_0" / "img_000.png"
    r = run_cli("audit", data, "--no-embeddings", "--fix", victim, "--cache-dir", tmp_path / "c", *FAST)
    assert r.code == 2 and "one of the audited files" in r.err and len(r.err.strip().splitlines()) == 1
    arrays = tmp_path / "a.npz"
    x = np.random.default_rng(0).integers(0, 255, (12, 16, 16), dtype=np.uint8)
    x[6] = x[2]  # an exact duplicate (same label)
    np.savez(arrays, images=x, labels=np.arange(12) % 2)
    r = run_cli("audit", arrays, "--no-embeddings", "--fix", tmp_path / "f.csv", "--cache-dir", tmp_path / "c", *FAST)
    assert r.code == 2 and "as .npz" in r.err
    r = run_cli("audit", arrays, "--no-embeddings", "--fix", tmp_path / "f.npz", "--cache-dir", tmp_path / "c", *FAST)
    assert r.code == 0, r
    with np.load(tmp_path / "f.npz") as z:
        assert z["kept_indices"].tolist() == [i for i in range(12) if i != 6]
        assert (z["images"] == np.delete(x, 6, axis=0)).all()


@pytest.mark.cli
def test_multilabel_data_is_audited(tmp_path):
    from .conftest import make_multilabel_csv

    csv_path = make_multilabel_csv(tmp_path / "ml", n=24)
    r = run_cli("audit", csv_path, "--json", tmp_path / "a.json", "--cache-dir", tmp_path / "c", *FAST)
    assert r.code == 0, r
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["splits"]["train"]["multi_label"] and "oof_exact_match" in doc["probe"]
    assert set(doc["balance"]["train"]["counts"]) == {"red", "green", "blue"}


@pytest.mark.cli
def test_missing_folder_is_a_one_line_error(tmp_path):
    r = run_cli("audit", tmp_path / "nowhere", *FAST)
    assert r.code == 2 and "data path not found" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.unit
def test_missing_dependency_names_the_extra():
    with pytest.raises(ImgclfError, match=r"pip install 'imgclf\[audit\]'"):
        require("no_such_module_for_imgclf")


@pytest.mark.unit
def test_hamming_pairs_match_brute_force_and_cap_partners():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    a = np.concatenate([base, base[:10] ^ np.uint64(0b101)])  # 10 planted pairs 2 bits apart
    got = {(i, j) for i, j, _ in hamming_pairs(a, max_distance=3, chunk=7)}
    brute = {(i, j) for i in range(len(a)) for j in range(i + 1, len(a)) if bin(int(a[i] ^ a[j])).count("1") <= 3}
    assert got == brute and len(got) >= 10
    same = np.zeros(6, dtype=np.uint64)
    assert len(hamming_pairs(same, max_distance=0, per_item=2)) == 5 + 4 + 3 + 2 + 1 - (3 + 2 + 1)  # <= 2 per row
    cross = hamming_pairs(base[:5], a, max_distance=2)
    assert {(int(i), int(j)) for i, j, _ in cross} == {(i, i) for i in range(5)} | {(i, 40 + i) for i in range(5)}


@pytest.mark.unit
def test_exact_groups_cosine_topk_and_folds():
    h = np.array([b"a", b"b", b"a", b"c", b"b", b"a"], dtype="S16")
    ok = np.array([True, True, True, True, True, False])
    assert [g.tolist() for g in exact_groups(h, ok)] == [[0, 2], [1, 4]]
    import torch

    x = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    sims, idx = cosine_topk(x, 3, chunk=16)
    full = x @ x.T
    full.fill_diagonal_(-2)
    ref_sims, _ = full.topk(3, dim=1)
    assert torch.allclose(sims, ref_sims, atol=1e-6) and not (idx == torch.arange(50)[:, None]).any()
    y = np.repeat(np.arange(3), [10, 7, 3])
    fold = stratified_folds(y, 5, seed=0)
    for c in range(3):
        counts = np.bincount(fold[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
