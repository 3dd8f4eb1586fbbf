"""Every script that writes a model folder refuses to write over its input and replaces an earlier output only as a
whole, at the end: quantize.py and ship_tiny.py (build_repo.py: test_build_repo_safety.py).

Run: `.venv/tf5/bin/python -m pytest tests/test_tool_output_safety.py -q` (and the same with `.venv/tf4`).
"""

from __future__ import annotations

import pytest
from conftest import ROOT
from test_build_repo_safety import snapshot

import folders
import quantize
import ship_tiny


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
    output = {"work": work, "inside-work": work / "AndesVL-Tiny", "containing-work": tmp_path,
              "repo-root": ROOT}[where]
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit, match="Refusing to write"):
        ship_tiny.main(["--work", str(work), "--output", str(output), "--demo-output", str(tmp_path / "demo")])
    assert snapshot(tmp_path) == before
