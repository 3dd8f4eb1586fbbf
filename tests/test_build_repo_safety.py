"""`andesvl_tools/build_repo.py --weights W --output O` never destroys its input, and never leaves stale weights behind.

Run: `.venv/tf5/bin/python -m pytest tests/test_build_repo_safety.py -q` (and the same with `.venv/tf4`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import build_repo


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder`: file hash, symlink target or folder marker (symlinks are not followed)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            state[rel] = "link:" + str(path.readlink())
        elif path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def weights(tiny_repos, tmp_path) -> Path:
    folder = tmp_path / "AndesVL-0.6B-weights"
    shutil.copytree(tiny_repos["siglip2"], folder)
    return folder


@pytest.fixture
def sharded(tiny_repos, tmp_path) -> Path:
    """The tiny siglip2 weights as two safetensors shards plus their index."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "AndesVL-0.6B-sharded"
    folder.mkdir()
    state = load_file(str(tiny_repos["siglip2"] / "model.safetensors"))
    keys = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k].contiguous() for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    size = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map})
    )
    return folder


@pytest.mark.parametrize("link", [False, True])
def test_output_equal_to_weights_is_refused(weights, link):
    before = snapshot(weights)
    with pytest.raises(ValueError, match="Refusing") as error:
        build_repo.build(None, "siglip2", weights, weights=weights, link=link, seed=0)
    assert str(weights) in str(error.value)
    assert snapshot(weights) == before
    assert leftovers(weights.parent) == []


@pytest.mark.parametrize("link", [False, True])
def test_cli_output_equal_to_weights_is_refused(weights, link):
    before = snapshot(weights)
    argv = ["--tiny", "siglip2", "--output", str(weights), "--weights", str(weights)] + (["--link"] if link else [])
    with pytest.raises(ValueError, match="Refusing"):
        build_repo.main(argv)
    assert snapshot(weights) == before


def test_nested_output_and_weights_are_refused(weights, tmp_path):
    before = snapshot(weights)
    with pytest.raises(ValueError, match="Refusing"):  # output inside the weights folder
        build_repo.build(None, "siglip2", weights / "sub" / "AndesVL-x", weights=weights, link=True, seed=0)
    with pytest.raises(ValueError, match="Refusing"):  # weights inside the output folder
        build_repo.build(None, "siglip2", weights.parent, weights=weights, link=False, seed=0)
    with pytest.raises(ValueError, match="Refusing"):  # same folder through a relative, unnormalised path
        build_repo.build(None, "siglip2", weights / ".." / weights.name, weights=weights, link=False, seed=0)
    assert snapshot(weights) == before
    assert not (weights / "sub").exists()


@pytest.mark.parametrize("link", [False, True])
def test_stale_single_file_weights_do_not_survive_new_shards(tiny_repos, sharded, tmp_path, link):
    output = tmp_path / "AndesVL-0.6B-assembled"
    shutil.copytree(tiny_repos["aimv2"], output)  # an older build: a model.safetensors of another model
    (output / "notes.txt").write_text("mine")
    sharded_before = snapshot(sharded)
    report = build_repo.build(None, "siglip2", output, weights=sharded, link=link, seed=0)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert report["weights"] == names and report["checked_keys"] > 0
    weight_files = sorted(p.name for p in output.iterdir() if build_repo.is_weights_file(p))
    assert weight_files == names  # exactly the new set: no stale model.safetensors
    assert all((output / n).is_symlink() == link for n in names)
    assert (output / "notes.txt").read_text() == "mine"  # a user's non-weights file stays
    assert json.loads((output / "config.json").read_text())["model_type"] == "andesvl-siglip2-qwen3"
    assert build_repo.verify_checkpoint(output, output)["checked_keys"]
    assert snapshot(sharded) == sharded_before
    assert leftovers(tmp_path) == []


def test_failing_verify_leaves_existing_output_untouched(tiny_repos, tmp_path):
    output = tmp_path / "AndesVL-0.6B-existing"
    shutil.copytree(tiny_repos["siglip2"], output)
    (output / "notes.txt").write_text("mine")
    before = snapshot(output)
    with pytest.raises(ValueError, match=r"\d+ missing, \d+ unexpected"):  # aimv2 weights for a siglip2 repo
        build_repo.build(None, "siglip2", output, weights=tiny_repos["aimv2"], link=False, seed=0)
    assert snapshot(output) == before
    assert leftovers(tmp_path) == []


def test_failing_verify_into_a_new_folder_creates_nothing(tiny_repos, tmp_path):
    output = tmp_path / "AndesVL-0.6B-new"
    with pytest.raises(ValueError, match=r"\d+ missing"):
        build_repo.build(None, "siglip2", output, weights=tiny_repos["aimv2"], link=True, seed=0)
    assert not output.exists() and leftovers(tmp_path) == []
