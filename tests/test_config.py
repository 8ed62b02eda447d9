"""Unit: typed config, YAML layers, dotted overrides, validation and recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgclf.api import make_config, nest, resume_config
from imgclf.config import Config, build_config, config_to_dict, dump_yaml, load_yaml, recipe_path
from imgclf.errors import ImgclfError

RECIPES = sorted((Path(__file__).parents[1] / "src/imgclf/recipes").glob("*.yaml"))


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = Config()
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    again = build_config([load_yaml(p)], [str(p)])
    assert again == cfg
    assert config_to_dict(again)["aug"]["scale"] == [0.08, 1.0]


def test_precedence_defaults_recipe_file_cli(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("optim:\n  lr: 0.02\ntrain:\n  epochs: 7\n")
    cfg = make_config("somewhere/", config_file=f, recipe="default", overrides={"train.epochs": "3"})
    assert cfg.optim.lr == 0.02  # file beats recipe (0.001)
    assert cfg.train.epochs == 3  # command line beats file
    assert cfg.data.input_size == 80  # from the recipe
    assert cfg.data.path == "somewhere/"


def test_no_data_means_embedded_default_recipe():
    cfg = make_config()
    assert cfg.data.path == "builtin:fashion-mnist"
    assert cfg.model.name == "tf_efficientnet_lite0" and cfg.model.weights == "packaged"


def test_user_data_does_not_get_the_default_recipe():
    cfg = make_config("imgs/")
    assert cfg.data.input_size == "auto" and cfg.train.epochs == Config().train.epochs


@pytest.mark.parametrize(
    ("layer", "needle"),
    [
        ({"optim": {"lrr": 1}}, "unknown config key 'optim.lrr'"),
        ({"optimizer": {"lr": 1}}, "unknown config key 'optimizer'"),
        ({"optim": {"lr": "fast"}}, "field 'optim.lr' expects float"),
        ({"optim": {"name": "adam"}}, "must be one of adamw, sgd"),
        ({"train": {"epochs": 0}}, "'train.epochs' must be >= 1"),
        ({"aug": {"scale": [0.9, 0.1]}}, "'aug.scale'"),
        ({"train": {"ema": "maybe"}}, "'train.ema' expects bool"),
        ({"data": 5}, "'data' must be a mapping"),
    ],
)
def test_bad_layers_name_the_field(layer, needle):
    with pytest.raises(ImgclfError) as e:
        build_config([layer], ["x.yaml"])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_strings_are_coerced():
    cfg = build_config(
        [nest({"optim.lr": "3e-4", "aug.scale": "[0.5, 1]", "train.ema": "false", "train.patience": "none"})], ["cli"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.aug.scale == (0.5, 1.0) and cfg.train.ema is False
    assert cfg.train.patience is None


def test_unreadable_and_non_mapping_yaml(tmp_path):
    with pytest.raises(ImgclfError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ImgclfError, match="not valid YAML at line"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ImgclfError, match="must hold a mapping"):
        load_yaml(lst)


def test_nest_rejects_undotted_keys():
    with pytest.raises(ImgclfError, match="section.field"):
        nest({"lr": 1})


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_parses_against_the_schema(path):
    cfg = build_config([load_yaml(path)], [str(path)])
    assert recipe_path(path.stem) == path
    assert isinstance(cfg, Config)


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ImgclfError, match="known: .*default"):
        recipe_path("nope")


def _saved_run(tmp_path):
    run = tmp_path / "runs" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (run / "config.yaml").write_text(dump_yaml(make_config("imgs/", overrides={"train.epochs": 4})))
    return run


def test_resume_config_reads_the_saved_config(tmp_path):
    _saved_run(tmp_path)
    cfg = resume_config(tmp_path / "runs", None, {"run.progress": "false", "train.epochs": "4"})
    assert cfg.run.name == "r1" and cfg.data.path == "imgs/" and cfg.train.epochs == 4
    assert cfg.run.progress is False


def test_resume_refuses_changes_that_break_exact_continuation(tmp_path):
    _saved_run(tmp_path)
    with pytest.raises(ImgclfError, match=r"'train.epochs' cannot change \(4 -> 6\)"):
        resume_config(tmp_path / "runs", "r1", {"train.epochs": 6})


@pytest.mark.unit
def test_inference_flags_are_generated_from_the_typed_config():
    """eval / predict / calibrate / knn take their shared flags from ``InferConfig``: same names, types, checks."""
    import typing

    from imgclf.cli import build_parser, config_from_args
    from imgclf.config import InferConfig
    from imgclf.errors import ImgclfError
    from imgclf.eval.tta import MERGES, MODES

    hints = typing.get_type_hints(InferConfig)
    assert typing.get_args(typing.get_args(hints["tta"])[0]) == MODES and typing.get_args(hints["tta_merge"]) == MERGES
    parser = build_parser()
    args = parser.parse_args(["eval", "runs/x", "--data", "d", "--no-progress", "--tta", "flip", "--max-pixels", "0"])
    cfg = config_from_args(InferConfig, args)
    assert (cfg.progress, cfg.tta, cfg.batch_size, cfg.max_pixels) == (False, "flip", 128, 0)
    assert cfg.kwargs()["max_pixels"] is None and cfg.kwargs()["tta_merge"] == "mean_logits"
    args = parser.parse_args(["predict", "runs/x", "a.png", "--strict-images", "--workers", "0"])
    assert config_from_args(InferConfig, args) == InferConfig(strict_images=True, workers=0)
    assert not hasattr(parser.parse_args(["calibrate", "runs/x"]), "tta")  # calibrate fits on single views
    with pytest.raises(ImgclfError, match="--batch-size must be >= 1"):
        config_from_args(InferConfig, parser.parse_args(["predict", "runs/x", "a.png", "--batch-size", "0"]))


@pytest.mark.unit
@pytest.mark.parametrize("argv,message", [
    (["eval", "r", "--data", "d", "--tta", "sideways"], "--tta: expects one of flip"),
    (["predict", "r", "a.png", "--batch-size", "many"], "--batch-size: expects int"),
])  # fmt: skip
def test_bad_generated_flag_values_are_one_line_errors(argv, message, capsys):
    from imgclf.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.unit
@pytest.mark.parametrize("cls,fn,skip", [
    ("ExportConfig", "imgclf.deploy.export:export_run", {"run", "fmt", "generated_ok", "int8_gate"}),
    ("BenchConfig", "imgclf.deploy.bench:bench_run", {"run_dir"}),
])  # fmt: skip
def test_verb_configs_match_the_functions_they_feed(cls, fn, skip):
    """The flags of export / bench are generated from these configs and passed on by name: the configs must
    name every keyword of the function, with the same defaults, so a new keyword cannot miss its flag."""
    import dataclasses
    import importlib
    import inspect

    import imgclf.config as config

    module, name = fn.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    fields = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
              for f in dataclasses.fields(getattr(config, cls))}  # fmt: skip
    defaults = {k: p.default for k, p in params.items() if k not in skip}
    assert set(fields) == set(defaults)
    for k, v in fields.items():
        assert v == defaults[k] or (isinstance(v, list) and tuple(v) == defaults[k]), (k, v, defaults[k])


@pytest.mark.unit
@pytest.mark.parametrize("argv,message", [
    (["knn", "build", "s", "--name", "x", "--per-class", "0"], "--per-class must be >= 1"),
    (["knn", "build", "s", "--name", "x", "--pixel-range", "[5,1]"], "--pixel-range must be auto, minmax"),
    (["knn", "episodes", "s", "--ways", "1"], "--ways must be >= 2"),
    (["knn", "episodes", "s", "--modes", "nearest"], "invalid choice: 'nearest'"),
    (["export", "r", "--pixels", "rgb"], "invalid choice: 'rgb'"),
    (["bench", "r", "--batch-sizes", "0"], "--batch-sizes must be >= 1"),
    (["serve", "r", "--max-batch", "0"], "--max-batch must be >= 1"),
])  # fmt: skip
def test_generated_flags_of_every_verb_check_their_values(argv, message, capsys):
    """knn, export, bench and serve flags come from typed configs; a bad value names the flag in one line."""
    from imgclf.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
