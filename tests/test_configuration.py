"""Configuration tests: official config.json files load verbatim; the committed repo JSON is what build_repo writes.

Run: `.venv/tf4/bin/python -m pytest tests/test_configuration.py -q` (and the same with `.venv/tf5`).
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from conftest import ROOT, build_repo


def _config_folder(tmp_path, config: dict, name: str = "AndesVL-2B-Thinking"):
    folder = tmp_path / name
    build_repo.write_repo_files(folder, config)
    return folder


@pytest.mark.parametrize("size", list(build_repo.SIZES))
def test_official_config_json_loads_verbatim(tmp_path, size):
    official = build_repo.official_config(size)
    config = AutoConfig.from_pretrained(_config_folder(tmp_path, official), trust_remote_code=True)
    vision, text = official["vision_config"], official["text_config"]
    assert type(config).__name__ == "AndesVLConfig"
    assert config.vision_type == ("siglip2" if size == "0.6B" else "aimv2")
    for key, value in vision.items():
        if key not in ("model_type", "torch_dtype"):
            assert getattr(config.vision_config, key) == value, key
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        assert getattr(config.text_config, key) == text[key], key
    assert config.tie_word_embeddings and config.text_config.tie_word_embeddings
    assert (config.image_token_id, config.image_start_token_id, config.image_end_token_id) == (151654, 151652, 151653)
    assert config.to_dict()["model_type"] == official["model_type"]


def test_config_round_trip_keeps_the_official_model_type(tmp_path):
    config = AutoConfig.from_pretrained(
        _config_folder(tmp_path, build_repo.official_config("0.6B")), trust_remote_code=True
    )
    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "andesvl-siglip2-qwen3"
    assert saved["vision_config"]["model_type"] == "siglip2_navit_rope_model"
    reloaded = AutoConfig.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert reloaded.vision_config.to_dict() == config.vision_config.to_dict()


def test_attn_implementation_reaches_both_sub_configs(tmp_path):
    folder = _config_folder(tmp_path, build_repo.official_config("1B"))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    assert config.vision_config._attn_implementation == "eager"
    assert config.text_config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "vision_update, message",
    [
        ({"model_type": "clip_vision_model"}, "Unknown vision_config model_type 'clip_vision_model'"),
        ({"fullatt_block_indexes": [0, 5]}, "window attention is not implemented"),
        ({"hidden_size": 1001}, "not divisible by num_attention_heads"),
        ({"hidden_size": 1000}, "head_dim=125 must be a multiple of 4"),
    ],
)
def test_bad_vision_config_raises(tmp_path, vision_update, message):
    official = build_repo.official_config("1B")
    official["vision_config"] = {**official["vision_config"], **vision_update}
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(_config_folder(tmp_path, official), trust_remote_code=True)


def test_committed_repo_json_is_what_build_repo_writes():
    """The repo root is the 4B Hub repo; its JSON must not drift from the generator (rerun it after edits)."""
    expected = build_repo.official_config("4B")
    assert json.loads((ROOT / "config.json").read_text()) == expected
    assert json.loads((ROOT / "generation_config.json").read_text()) == build_repo.GENERATION_CONFIG
    assert json.loads((ROOT / "preprocessor_config.json").read_text()) == build_repo.preprocessor_config(expected)
    assert json.loads((ROOT / "processor_config.json").read_text()) == build_repo.PROCESSOR_CONFIG
    assert json.loads((ROOT / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    assert set(expected["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForCausalLM",
        "AutoModelForImageTextToText",
    }


def test_remote_code_is_import_pure():
    """Remote-code modules import only torch/transformers/PIL/numpy/stdlib at module level and read no env vars."""
    allowed = {
        "torch",
        "transformers",
        "PIL",
        "numpy",
        "__future__",
        "collections",
        "typing",
        "math",
        "base64",
        "binascii",
        "contextlib",
        "copy",
        "io",
        "os",
        "warnings",
        "logging",
        "re",
        "json",
        "dataclasses",
        "functools",
        "pathlib",
        "inspect",
        "time",
    }
    for name in build_repo.REMOTE_CODE_FILES:
        source = (ROOT / name).read_text()
        assert "import flash_attn" not in source and "from flash_attn" not in source, name
        assert "os.environ" not in source and "getenv" not in source, name
        for line in source.splitlines():
            if line.startswith(("import ", "from ")) and not line.startswith("from ."):
                module = line.split()[1].split(".")[0]
                assert module in allowed, f"{name}: {line}"
