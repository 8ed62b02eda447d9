"""The stages import downwards only: io/errors/config < data, models < train < eval < deploy < api/cli
(DESIGN.md). Parsed from the source with ast, so a new upward import fails here before it becomes a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "imgclf"
#: module (or package) -> layer; a module may import its own layer and any lower one
LAYERS = {
    "errors": 0, "io": 0, "config": 0, "dist": 0, "rundir": 0,
    "data": 1, "models": 1, "plots": 1,
    "artifact": 2,
    "train": 3,
    "eval": 4,
    "deploy": 5,
    # fewshot: the public re-exports of the k-NN stages
    "pipeline": 6, "predict": 6, "fewshot": 6, "compress": 6, "backbones": 6, "zeroshot": 6,
    "retrain": 6,
    "api": 7, "cli": 8, "__init__": 9, "__main__": 9,
}  # fmt: skip


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imgclf-relative module, line) of every import of imgclf code in ``path``, resolved from relative form."""
    rel = path.relative_to(SRC).with_suffix("")
    package = list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = (
                    [".".join([*base, node.module])] if node.module else [".".join([*base, a.name]) for a in node.names]
                )
            elif node.module and node.module.startswith("imgclf."):
                names = [node.module.removeprefix("imgclf.")]
            else:
                continue
            out += [(n, node.lineno) for n in names if n]
    return out


@pytest.mark.unit
def test_no_stage_imports_a_higher_one():
    bad = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    for path in files:
        me = ".".join(path.relative_to(SRC).with_suffix("").parts)
        for target, line in _imports(path):
            if _layer(target) > _layer(me):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


@pytest.mark.unit
def test_plots_leave_the_users_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a notebook user's choice
    try:
        from imgclf.plots import lr_find_plot

        res = {"lrs": [1e-4, 1e-3, 1e-2], "losses": [2.0, 1.5, 3.0], "smoothed": [2.0, 1.6, 2.5],
               "suggested_lr": 1e-3, "min_loss_lr": 1e-3, "model": "m", "strategy": "s"}  # fmt: skip
        lr_find_plot(res, tmp_path / "lr.png")
        assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)


@pytest.mark.unit
def test_no_function_is_longer_than_80_lines():
    """Long functions hide the steps of the pipeline (issue 11: no function over ~80 lines); split them."""
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


@pytest.mark.unit
def test_stages_read_artifact_sections_through_the_type():
    """Temperature, OOD, drift and task live in typed ``Artifact`` fields; kinds are asked through the registry."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern in ('extra["calibration"]', 'extra.get("calibration")', 'extra.get("ood")', 'extra["ood"]',
                        'extra.get("drift")', 'extra.get("task")', 'kind == "knn"', "kind == KIND"):  # fmt: skip
            if pattern in text:
                bad.append(f"{path.relative_to(SRC)}: {pattern}")
    assert not bad, "\n".join(bad)
