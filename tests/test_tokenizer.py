"""AndesVL tokenizer: the Qwen3 tokenizer with <|vision_start|>/<|vision_end|> renamed to <img>/</img>.

Runs against the files at the repo root, offline, under transformers 4.57.x and 5.x.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BPE_VOCAB_SIZE = 151643
EMBEDDING_ROWS = 151936

# id -> (content, special)
EXPECTED_ADDED = {
    151643: ("<|endoftext|>", True),
    151644: ("<|im_start|>", True),
    151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True),
    151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<img>", True),
    151653: ("</img>", True),
    151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True),
    151656: ("<|video_pad|>", True),
    151657: ("<tool_call>", False),
    151658: ("</tool_call>", False),
    151659: ("<|fim_prefix|>", False),
    151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False),
    151662: ("<|fim_pad|>", False),
    151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
    151665: ("<tool_response>", False),
    151666: ("</tool_response>", False),
    151667: ("<think>", False),
    151668: ("</think>", False),
}


def _read_json(name: str) -> dict:
    return json.loads((ROOT / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoTokenizer

        yield AutoTokenizer.from_pretrained(str(ROOT))


@pytest.fixture(scope="module")
def tokenizer_config() -> dict:
    return _read_json("tokenizer_config.json")


@pytest.fixture(scope="module")
def tokenizer_json() -> dict:
    return _read_json("tokenizer.json")


# --- files -------------------------------------------------------------------------------------


def test_tokenizer_config_fields(tokenizer_config):
    c = tokenizer_config
    assert c["tokenizer_class"] == "Qwen2Tokenizer"
    assert c["eos_token"] == "<|im_end|>"
    assert c["pad_token"] == "<|endoftext|>"
    assert c["bos_token"] is None
    assert c["add_bos_token"] is False
    assert c["model_max_length"] == 131072
    assert c["padding_side"] == "left"
    assert c["errors"] == "replace"
    assert c["clean_up_tokenization_spaces"] is False
    assert c["split_special_tokens"] is False
    assert "chat_template" not in c
    assert not (ROOT / "tokenizer_config.json").read_text(encoding="utf-8").count("TokenizersBackend")


def test_tokenizer_config_added_tokens_decoder(tokenizer_config):
    dec = tokenizer_config["added_tokens_decoder"]
    assert {int(k) for k in dec} == set(EXPECTED_ADDED)
    for idx, (content, special) in EXPECTED_ADDED.items():
        entry = dec[str(idx)]
        assert entry["content"] == content
        assert entry["special"] is special
        assert entry["lstrip"] is entry["rstrip"] is entry["normalized"] is entry["single_word"] is False


def test_tokenizer_json_consistent(tokenizer_json):
    vocab = tokenizer_json["model"]["vocab"]
    assert tokenizer_json["model"]["type"] == "BPE"
    assert len(vocab) == BPE_VOCAB_SIZE
    assert sorted(vocab.values()) == list(range(BPE_VOCAB_SIZE))
    added = {t["id"]: (t["content"], t["special"]) for t in tokenizer_json["added_tokens"]}
    assert added == EXPECTED_ADDED
    # The added tokens live outside the BPE vocabulary, so no content can map to two ids.
    assert not {c for c, _ in EXPECTED_ADDED.values()} & set(vocab)
    for name in ("<|vision_start|>", "<|vision_end|>", "<|obj_ref_start|>", "<|obj_ref_end|>"):
        assert name not in vocab
        assert name not in {c for c, _ in added.values()}


def test_side_files_agree(tokenizer_json):
    if (ROOT / "vocab.json").exists():
        assert _read_json("vocab.json") == tokenizer_json["model"]["vocab"]
    if (ROOT / "added_tokens.json").exists():
        assert _read_json("added_tokens.json") == {c: i for i, (c, _) in EXPECTED_ADDED.items()}
    if (ROOT / "special_tokens_map.json").exists():
        stm = _read_json("special_tokens_map.json")
        assert stm["eos_token"]["content"] == "<|im_end|>"
        assert stm["pad_token"]["content"] == "<|endoftext|>"
        assert "<img>" in stm["additional_special_tokens"]
        assert "<|vision_start|>" not in stm["additional_special_tokens"]


def test_build_script_config_matches_repo(tokenizer_config):
    """andesvl_tools/build_tokenizer.py (stdlib only) still produces the committed tokenizer_config.json."""
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "andesvl_tools" / "build_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build_tokenizer_config() == tokenizer_config
    assert mod.ADDED_TOKENS == EXPECTED_ADDED


# --- loaded tokenizer --------------------------------------------------------------------------


def test_class_and_size(tokenizer):
    assert type(tokenizer).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    assert len(tokenizer) == 151669
    assert len(tokenizer) <= EMBEDDING_ROWS
    assert tokenizer.model_max_length == 131072


def test_hello_world(tokenizer):
    assert tokenizer("Hello, world!", add_special_tokens=False)["input_ids"] == [9707, 11, 1879, 0]
    # No BOS / EOS is added by default either.
    assert tokenizer("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]


@pytest.mark.parametrize("idx", sorted(EXPECTED_ADDED))
def test_added_token_table(tokenizer, idx):
    content, special = EXPECTED_ADDED[idx]
    assert tokenizer.convert_ids_to_tokens(idx) == content
    assert tokenizer.convert_tokens_to_ids(content) == idx
    assert tokenizer.decode([idx]) == content
    assert tokenizer.encode(content, add_special_tokens=False) == [idx]
    added = tokenizer.added_tokens_decoder[idx]
    assert added.content == content
    assert added.special is special
    assert (content in tokenizer.all_special_tokens) is special


@pytest.mark.parametrize("text,idx", [("<img>", 151652), ("</img>", 151653), ("<|vision_pad|>", 151654)])
def test_vision_tokens_single_id(tokenizer, text, idx):
    assert tokenizer.encode(text, add_special_tokens=False) == [idx]
    ids = tokenizer.encode(f"Look {text} here", add_special_tokens=False)
    assert ids.count(idx) == 1


def test_image_prompt_roundtrip(tokenizer):
    text = "<img><|image_pad|><|image_pad|></img>\nDescribe."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[:4] == [151652, 151655, 151655, 151653]
    assert tokenizer.decode(ids) == text


def test_grounding_markers_are_plain_text(tokenizer):
    for text in ("<|obj_ref_start|>", "<|obj_ref_end|>", "<|vision_start|>", "<|vision_end|>"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) > 1 and max(ids) < BPE_VOCAB_SIZE
        assert tokenizer.decode(ids) == text


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("<think>reasoning</think>answer<|im_end|>", add_special_tokens=False)
    assert ids[0] == 151667 and 151668 in ids and ids[-1] == 151645
    out = tokenizer.decode(ids, skip_special_tokens=True)
    assert out == "<think>reasoning</think>answer"
    assert "<|im_end|>" not in out
    assert tokenizer.decode(ids) == "<think>reasoning</think>answer<|im_end|>"


def test_special_token_ids(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == 151643
    assert tokenizer.bos_token is None


def test_left_padding(tokenizer):
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["Hi", "Hello, world!"], padding=True)
    assert batch["input_ids"][0][:2] == [151643, 151643]
    assert batch["attention_mask"][0][:2] == [0, 0]
    assert batch["input_ids"][1] == [9707, 11, 1879, 0]


def test_slow_tokenizer_agrees(tokenizer, monkeypatch):
    """transformers 4.x also has the pure-Python tokenizer (vocab.json + merges.txt)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5 has a single (tokenizers-backed) Qwen2Tokenizer")
    if not (ROOT / "vocab.json").exists() or not (ROOT / "merges.txt").exists():
        pytest.skip("no vocab.json/merges.txt")
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    slow = AutoTokenizer.from_pretrained(str(ROOT), use_fast=False)
    assert type(slow).__name__ == "Qwen2Tokenizer"
    assert len(slow) == len(tokenizer)
    text = "<img><|image_pad|></img>Hello, world! <think>x</think> 你好<|im_end|>"
    assert slow.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert slow.padding_side == "left"
