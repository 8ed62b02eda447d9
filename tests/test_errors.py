"""Bad input: one clear line naming the file or field, exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from .conftest import TINY, make_folder, run_cli


def _assert_one_line_error(r, needle: str) -> None:
    assert r.code == 2, r
    lines = [x for x in r.err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, r.err
    assert lines[0].startswith("imgclf: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in r.err


@pytest.fixture()
def data(tmp_path):
    return make_folder(tmp_path / "ok", n_per_class=3, classes=2)


def test_missing_path(tmp_path):
    _assert_one_line_error(run_cli("train", "--data", tmp_path / "nope", *TINY), "data path not found")


def test_empty_class_folder(data):
    (data / "class_9").mkdir()
    _assert_one_line_error(run_cli("train", "--data", data, *TINY), "class_9: class folder is empty")


def test_one_class_only(tmp_path):
    one = make_folder(tmp_path / "one", n_per_class=3, classes=1)
    _assert_one_line_error(run_cli("train", "--data", one, *TINY), "only one class")


def test_csv_missing_columns_and_files(tmp_path, data):
    c = tmp_path / "a.csv"
    c.write_text("image,class\nx.png,a\n")
    _assert_one_line_error(run_cli("train", "--data", c, *TINY), "missing columns 'path', 'label'")
    c.write_text("path,label\nok/class_0/img_000.png,a\nmissing.png,b\n")
    _assert_one_line_error(run_cli("train", "--data", c, *TINY), "missing.png")


def test_unknown_model(data):
    _assert_one_line_error(run_cli("train", "--data", data, *TINY, "--model", "resnet181"), "unknown model 'resnet181'")


def test_unreadable_config(tmp_path, data):
    _assert_one_line_error(run_cli("train", "--config", tmp_path / "none.yaml"), "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [\n")
    _assert_one_line_error(run_cli("train", "--config", bad), "not valid YAML")


def test_unknown_config_key_in_file_and_flag(tmp_path, data):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    _assert_one_line_error(run_cli("train", "--config", f, "--data", data), "unknown config key 'optim.learning_rate'")
    _assert_one_line_error(
        run_cli("train", "--data", data, "--optim.momentm", "0.8"), "unknown config key 'optim.momentm'"
    )
    _assert_one_line_error(run_cli("train", "--data", data, "--epochs", "many"), "'train.epochs' expects int")


def test_bad_run_for_eval_and_predict(tmp_path, data):
    _assert_one_line_error(run_cli("eval", tmp_path / "norun", "--data", data), "run directory not found")
    _assert_one_line_error(run_cli("predict", tmp_path / "norun", data), "run directory not found")


def test_eval_data_with_unknown_classes(tiny_run, tmp_path):
    other = make_folder(tmp_path / "other", n_per_class=2, classes=4)
    _assert_one_line_error(
        run_cli("eval", tiny_run, "--data", other, "--no-progress"), "classes not known to the model: class_3"
    )


def test_predict_missing_input(tiny_run, tmp_path):
    _assert_one_line_error(run_cli("predict", tiny_run, tmp_path / "ghost.png"), "input not found")


def test_resume_without_checkpoint(tmp_path):
    _assert_one_line_error(run_cli("train", "--resume", "--output", tmp_path), "no run with a checkpoint")


def test_unknown_subcommand_argument():
    _assert_one_line_error(run_cli("predict"), "the following arguments are required")


def test_error_raised_in_a_loader_worker_prints_as_one_line():
    """torch re-raises a worker's ImgclfError with the worker's traceback in front; the CLI prints its message."""
    from torch._utils import ExceptionWrapper

    from imgclf.cli import _one_line
    from imgclf.errors import ImgclfError

    try:
        raise ImgclfError("shards/a.tar: member 7.png changed since it was indexed")
    except ImgclfError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ImgclfError) as e:
        wrapped.reraise()
    assert "Original Traceback" in str(e.value)
    assert _one_line(str(e.value)) == "shards/a.tar: member 7.png changed since it was indexed"
    assert _one_line("plain message") == "plain message"
