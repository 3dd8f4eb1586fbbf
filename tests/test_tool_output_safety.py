"""Every script that writes a model folder refuses to write over its input: quantize.py and ship_tiny.py also replace
an earlier output only as a whole, at the end; train.py and finetune_lora.py refuse an output that is or contains
the model they start from (build_repo.py: test_build_repo_safety.py).

Run: `.venv/tf5/bin/python -m pytest tests/test_tool_output_safety.py -q` (and the same with `.venv/tf4`).
"""

from __future__ import annotations

import pytest
from test_build_repo_safety import snapshot

from andesvl_tools import folders, quantize, ship_tiny
from conftest import ROOT


def model_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    return path


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_quantize_refuses_an_output_that_overlaps_the_source(tmp_path, where):
    source = model_folder(tmp_path / "model" / "float")
    output = {"same": source, "inside": source / "int4", "containing": source.parent}[where]
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="must not be, contain or lie inside the source folder"):
        quantize.check_folders(source, output)
    assert snapshot(tmp_path) == before


def test_quantize_refuses_a_foreign_non_empty_output(tmp_path):
    source = model_folder(tmp_path / "float")
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty folder that no earlier quantize.py run wrote"):
        quantize.check_folders(source, output)
    (output / quantize.REPORT_NAME).write_text("{}")  # an earlier quantize.py output may be replaced
    quantize.check_folders(source, output)


def test_a_staged_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    output = model_folder(tmp_path / "out")
    (output / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    before = snapshot(output)
    with pytest.raises(RuntimeError), folders.staged_folder(output) as staged:
        (staged / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("crash while writing")
    assert snapshot(output) == before  # a failed run leaves the old output as it was
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # and no staging folder behind
    with folders.staged_folder(output) as staged:
        (staged / "model.safetensors").write_bytes(b"new")
    assert sorted(path.name for path in output.iterdir()) == ["model.safetensors"]  # no stale shard survives
    assert (output / "model.safetensors").read_bytes() == b"new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["work", "inside-work", "containing-work", "repo-root"])
def test_ship_tiny_refuses_to_write_over_its_input_or_the_repo(tmp_path, where):
    work = tmp_path / "work"
    model_folder(work / "AndesVL-Tiny")
    (work / "eval").mkdir()
    (work / "eval" / "test.json").write_text("{}")
    output = {"work": work, "inside-work": work / "AndesVL-Tiny", "containing-work": tmp_path, "repo-root": ROOT}[where]
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit, match="Refusing to write"):
        ship_tiny.main(["--work", str(work), "--output", str(output), "--demo-output", str(tmp_path / "demo")])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["same", "containing"])
def test_train_refuses_an_output_over_its_init_model(tmp_path, capsys, where):
    from andesvl_tools import train

    init = model_folder(tmp_path / "runs" / "pretrain")
    output = {"same": init, "containing": tmp_path / "runs"}[where]
    with pytest.raises(SystemExit):
        train.parse_args(
            [
                "--init",
                str(init),
                "--stage",
                "sft",
                "--data",
                str(tmp_path),
                "--work-dir",
                str(tmp_path / "work"),
                "--output",
                str(output),
            ]
        )
    assert "--output would write over --init" in capsys.readouterr().err
    train.parse_args(
        [
            "--init",
            str(init),
            "--stage",
            "sft",
            "--data",
            str(tmp_path),
            "--work-dir",
            str(tmp_path / "work"),
            "--output",
            str(tmp_path / "sft"),
        ]
    )  # apart: accepted


@pytest.mark.parametrize("where", ["same", "containing"])
def test_finetune_refuses_an_adapter_folder_over_its_model(tmp_path, capsys, where):
    from andesvl_tools import finetune_lora

    model = model_folder(tmp_path / "models" / "base")
    output = {"same": model, "containing": tmp_path / "models"}[where]
    base = ["--model", str(model), "--name", "ocr", "--train-file", str(tmp_path / "train.jsonl")]
    with pytest.raises(SystemExit):
        finetune_lora.parse_args([*base, "--output-dir", str(output)])
    assert "--output-dir would write over --model" in capsys.readouterr().err
    assert finetune_lora.parse_args(base).output_dir == model / "adapters" / "ocr"  # the default layout: inside
