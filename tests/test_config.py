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
    assert cfg.data.input_size is None and cfg.train.epochs == Config().train.epochs


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
