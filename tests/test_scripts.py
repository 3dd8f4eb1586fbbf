"""Smoke tests of the command-line scripts on tiny random repos (their answers are meaningless; their plumbing is not).

Run: `.venv/tf4/bin/python -m pytest tests/test_scripts.py -q` (and the same with `.venv/tf5`).
"""

from __future__ import annotations

import json

import chat
import pytest
from conftest import ROOT, build_repo

DEMO_IMAGE = ROOT / "assets" / "demo_shapes.png"


def test_chat_cli_streamed_equals_plain(tiny_repo, tmp_path, capsys):
    common = ["--model", str(tiny_repo), "--image", str(DEMO_IMAGE), "--max-new-tokens", "6"]
    chat.main(common + ["--output", str(tmp_path / "plain.json"), "What is shown?"])
    chat.main(common + ["--stream", "--output", str(tmp_path / "stream.json"), "What is shown?"])
    plain = json.loads((tmp_path / "plain.json").read_text())
    streamed = json.loads((tmp_path / "stream.json").read_text())
    assert plain["answer"] == streamed["answer"]
    assert plain["answer"] in capsys.readouterr().out


def test_chat_cli_thinking_and_two_images(tiny_repo, tmp_path):
    args = ["--model", str(tiny_repo), "--image", str(DEMO_IMAGE), "--image", str(DEMO_IMAGE), "--thinking",
            "--max-new-tokens", "3", "--output", str(tmp_path / "out.json"), "Same picture twice?"]
    chat.main(args)
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["answer"].startswith("<think>") and report["images"] == [str(DEMO_IMAGE)] * 2


def test_build_repo_with_weights_verifies_and_copies(tiny_repos, tmp_path):
    output = tmp_path / "AndesVL-0.6B-assembled"
    report = build_repo.build(None, "siglip2", output, weights=tiny_repos["siglip2"], link=True, seed=1)
    assert report["weights"] == ["model.safetensors"] and (output / "model.safetensors").is_symlink()
    assert report["checked_keys"] > 0
    for name in build_repo.SHARED_FILES + ("config.json", "preprocessor_config.json", "processor_config.json"):
        assert (output / name).is_file(), name


def test_build_repo_rejects_weights_of_another_encoder(tiny_repos, tmp_path):
    with pytest.raises(ValueError, match=r"\d+ missing, \d+ unexpected"):
        build_repo.build(None, "siglip2", tmp_path / "AndesVL-x", weights=tiny_repos["aimv2"], link=True, seed=0)


def test_build_repo_cli_requires_a_size(capsys):
    with pytest.raises(SystemExit):
        build_repo.parse_args(["--output", "x"])
    with pytest.raises(ValueError, match="Unknown size '3B'"):
        build_repo.official_config("3B")
