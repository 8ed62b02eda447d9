"""Shared fixtures: tiny generated image data sets, a CLI runner, and one tiny trained run."""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach for the network
os.environ.setdefault("IMGCLF_CACHE", tempfile.mkdtemp(prefix="imgclf-test-cache-"))  # compiled exports

#: fast settings for end-to-end runs on tiny data with timm's tiny test models
TINY = [
    "--model",
    "test_efficientnet",
    "--weights",
    "none",
    "--input-size",
    "32",
    "--batch-size",
    "16",
    "--data.num_workers",
    "0",
    "--no-progress",
    "--train.ema",
    "false",
    "--lr",
    "0.01",
    "--sched.warmup_epochs",
    "0",
]

#: one clearly separable colour per class
PALETTE = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 230, 40)]


def make_image(cls: int, rng: np.random.Generator, size: int = 24) -> Image.Image:
    """A noisy image dominated by the class colour, with a class-dependent bright stripe."""
    base = np.array(PALETTE[cls], dtype=np.float32)
    arr = base + rng.normal(0, 25, (size, size, 3))
    arr[:, (cls * size // 4) : (cls * size // 4) + 3] = 255
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


ML_CLASSES = ["red", "green", "blue"]


def make_multilabel_image(labels: list[int], rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A noisy grey image whose quadrant k holds a patch of colour k for every label k in ``labels``."""
    arr = 110 + rng.normal(0, 20, (size, size, 3))
    h = size // 2
    for k in labels:
        r, c = divmod(k, 2)
        arr[r * h + 2 : r * h + h - 2, c * h + 2 : c * h + h - 2] = PALETTE[k]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_multilabel_csv(root: Path, n: int = 60, seed: int = 0, sep: str = "|") -> Path:
    """``root/labels.csv`` (``path,labels``: label sets of ``ML_CLASSES`` joined by ``sep``, empty sets included)
    over PNGs in ``root/images``; every non-empty subset of the three labels and the empty set appear."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["path,labels"]
    for i in range(n):
        labels = [k for k in range(3) if (i % 8) >> k & 1]  # the 8 subsets in turn
        make_multilabel_image(labels, rng).save(root / "images" / f"im_{i:03d}.png")
        lines.append(f"images/im_{i:03d}.png,{sep.join(ML_CLASSES[k] for k in labels)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def make_folder(root: Path, n_per_class: int = 12, classes: int = 3, seed: int = 0, nested: bool = False) -> Path:
    """An ImageFolder of PNGs: ``root/class_k/[sub/]img_i.png``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        for i in range(n_per_class):
            sub = d / "nested" if nested and i % 2 else d
            sub.mkdir(parents=True, exist_ok=True)
            make_image(c, rng).save(sub / f"img_{i:03d}.png")
    return root


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out[-500:]!r}, err={self.err[-800:]!r})"


def run_cli(*argv: str) -> Result:
    """``imgclf.cli.main(argv)`` with stdout/stderr captured."""
    from imgclf.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tiny") / "train", n_per_class=16)


@pytest.fixture(scope="session")
def tiny_test_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tiny_test") / "test", n_per_class=8, seed=1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_folder) -> Path:
    """A run trained once per session on the tiny folder (used by eval/predict/artifact tests)."""
    out = tmp_path_factory.mktemp("runs")
    r = run_cli("train", "--data", tiny_folder, "--epochs", "4", "--output", out, "--name", "tiny", *TINY)
    assert r.code == 0, r
    return out / "tiny"


@pytest.fixture(scope="session")
def clear_run(tmp_path_factory, tiny_folder) -> Path:
    """The tiny folder trained to clear margins (10 epochs), for int8 and runtime-parity checks: they assert that
    separable classes survive 8 bits, which a 4-epoch run's small logits do not promise (its int8 agreement was
    0.75-0.83 on AMD Zen 5)."""
    out = tmp_path_factory.mktemp("clear")
    r = run_cli("train", "--data", tiny_folder, "--epochs", "10", "--output", out, "--name", "tiny", *TINY)
    assert r.code == 0, r
    return out / "tiny"


#: fixtures and calls that mean a test trains, serves or runs a command end to end
_CLI_SIGNS = ("run_cli(", "Served(", "train(", "subprocess", "fit(", "fit_probe(", "_loop(", "_cmd(", "export_run(")
_CLI_FIXTURES = {"tiny_run", "clear_run", "run", "server", "moved", "served"}


def pytest_collection_modifyitems(config, items):
    """Tiers: every test not marked otherwise is ``cli`` when it runs a command, trains, serves or uses a
    trained run, else ``unit`` (``pytest -m unit``: the fast tier while working; CI runs everything). ``contract``
    and ``regression`` tests are tiers of their own (``pytest -m contract``, ``-m regression``)."""
    import inspect

    for item in items:
        if any(any(item.iter_markers(name)) for name in ("unit", "cli", "contract", "regression")):
            continue
        fn = getattr(item, "function", None)
        src = inspect.getsource(fn) if fn is not None else ""
        heavy = set(getattr(item, "fixturenames", ())) & _CLI_FIXTURES or any(s in src for s in _CLI_SIGNS)
        item.add_marker(pytest.mark.cli if heavy else pytest.mark.unit)


#: a tiny open_clip ViT (random weights) registered as ``tiny-vit`` by the ``tiny_clip`` fixture
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A local open_clip checkpoint (safetensors) of the config ``tiny-vit`` (registered with
    ``open_clip.add_model_config``), loadable as ``--model tiny-vit --pretrained FILE``; seeded, offline."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("open_clip")
    (d / "configs").mkdir()
    (d / "configs" / "tiny-vit.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(d / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit")
    path = d / "tiny-vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
