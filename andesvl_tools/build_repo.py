"""Assemble a complete AndesVL Hub repo folder for one size, optionally next to official weights.

    python -m andesvl_tools.build_repo --size 0.6B --output out/AndesVL-0.6B-Instruct \
        --weights /path/to/OPPOer/AndesVL-0.6B-Instruct
    python -m andesvl_tools.build_repo --size 4B --output .                 # regenerate the JSON files of this repo
    root
    python -m andesvl_tools.build_repo --tiny aimv2 --output /tmp/AndesVL-tiny  # a tiny random model (tests, demo)

The folder gets the remote code, `config.json` (official field set, with `auto_map`), `generation_config.json`,
`preprocessor_config.json` and `processor_config.json` for the size's encoder, the tokenizer files, the chat
template, the model card and `adapters/README.md`. With `--weights DIR`, every `*.safetensors` / `*.bin` shard (and
its index) is copied (or linked) in, after checking on the meta device that the checkpoint's keys and shapes are
exactly the model's: zero missing and zero unexpected keys (`language_model.lm_head.weight` may be absent: tied).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .folders import overlap_error

ROOT = Path(__file__).resolve().parents[1]
REMOTE_CODE_FILES = (
    "configuration_andesvl.py",
    "modeling_andesvl.py",
    "adapters_andesvl.py",
    "chat_andesvl.py",
    "image_processing_andesvl.py",
    "processing_andesvl.py",
    "quantization_andesvl.py",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
SHARED_FILES = REMOTE_CODE_FILES + TOKENIZER_FILES + ("chat_template.jinja",)
TIED_KEY = "language_model.lm_head.weight"

AUTO_MAP = {
    "AutoConfig": "configuration_andesvl.AndesVLConfig",
    "AutoModel": "modeling_andesvl.AndesVLForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_andesvl.AndesVLForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_andesvl.AndesVLForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_andesvl.AndesVLProcessor"}
IMAGE_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_andesvl.AndesVLImageProcessor",
    "AutoProcessor": "processing_andesvl.AndesVLProcessor",
}


def qwen3_text_config(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    """The Qwen3 `text_config` of the official checkpoints (only the widths differ between sizes)."""
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    }


AIMV2_LARGE = {
    "model_type": "aimv2",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 24,
    "num_attention_heads": 8,
    "num_channels": 3,
    "image_size": 448,
    "patch_size": 14,
    "rms_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "projection_dropout": 0.0,
    "qkv_bias": False,
    "use_bias": False,
    "hidden_stride": 2,
    "window_size": 112,
    "fullatt_block_indexes": None,
    "temporal_patch_size": 1,
    "preserve_original_pe": True,
    "interpolate_pe_method": "two_dim",
    "disable_rope": False,
    "min_pixels": 3136,
    "max_pixels": 1960000,
    "torch_dtype": "bfloat16",
}
SIGLIP2_BASE = {
    "model_type": "siglip2_navit_rope_model",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-06,
    "attention_dropout": 0.0,
    "rope_theta": 10000.0,
    "num_patches": 1024,
    "preserve_original_pe": True,
    "hidden_stride": 2,
    "torch_dtype": "bfloat16",
}
SIZES = {
    "0.6B": (SIGLIP2_BASE, qwen3_text_config(1024, 28, 16, 3072)),
    "1B": (AIMV2_LARGE, qwen3_text_config(1024, 28, 16, 3072)),
    "2B": (AIMV2_LARGE, qwen3_text_config(2048, 28, 16, 6144)),
    "4B": (AIMV2_LARGE, qwen3_text_config(2560, 36, 32, 9728)),
}
# Tiny shapes for tests and the embedded demo: every code path of the real sizes, a few MB of weights.
TINY_VISION = {
    "aimv2": {
        **AIMV2_LARGE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 112,
        "torch_dtype": "float32",
    },
    "siglip2": {
        **SIGLIP2_BASE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_patches": 64,
        "torch_dtype": "float32",
    },
}
TINY_TEXT = {**qwen3_text_config(64, 2, 4, 128), "num_key_value_heads": 2, "head_dim": 16, "torch_dtype": "float32"}
# vLLM's CPU attention kernels take head_dim 32 and up (not 16): `--head-dim 32` builds a tiny repo vLLM can serve.
TINY_HEAD_DIMS = (16, 32)


def model_config(vision: dict, text: dict, dtype: str) -> dict:
    vision_type = "siglip2" if vision["model_type"] == SIGLIP2_BASE["model_type"] else "aimv2"
    return {
        "architectures": ["AndesVLForConditionalGeneration"],
        "auto_map": AUTO_MAP,
        "model_type": f"andesvl-{vision_type}-qwen3",
        "vision_config": vision,
        "text_config": text,
        "image_token_id": 151654,
        "image_start_token_id": 151652,
        "image_end_token_id": 151653,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "dtype": dtype,
        # 4.57.3-4.57.6 warn about a Mistral regex for any local tokenizer whose config names a version in that range.
        "transformers_version": "4.57.1",
    }


def official_config(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; expected one of {list(SIZES)}.")
    vision, text = SIZES[size]
    return model_config(vision, text, "bfloat16")


def tiny_config(vision_type: str, head_dim: int = TINY_TEXT["head_dim"]) -> dict:
    if vision_type not in TINY_VISION:
        raise ValueError(f"Unknown tiny vision type {vision_type!r}; expected one of {list(TINY_VISION)}.")
    if head_dim not in TINY_HEAD_DIMS:
        raise ValueError(f"Unknown tiny head_dim {head_dim}; expected one of {list(TINY_HEAD_DIMS)}.")
    return model_config(TINY_VISION[vision_type], {**TINY_TEXT, "head_dim": head_dim}, "float32")


def preprocessor_config(config: dict) -> dict:
    """Image-processor settings of the encoder: AIMv2 uses CLIP mean/std, SigLIP2 0.5 (the pad colour follows)."""
    vision = config["vision_config"]
    siglip2 = vision["model_type"] == SIGLIP2_BASE["model_type"]
    return {
        "auto_map": IMAGE_PROCESSOR_AUTO_MAP,
        "image_processor_type": "AndesVLImageProcessor",
        "processor_class": "AndesVLProcessor",
        "patch_size": vision["patch_size"],
        "merge_size": vision["hidden_stride"],
        "image_mean": [0.5, 0.5, 0.5] if siglip2 else [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.5, 0.5, 0.5] if siglip2 else [0.26862954, 0.26130258, 0.27577711],
        "resize_mode": "hf_chat",
        "max_size": None,
        "min_size": 0,
        "image_scale": 1.0,
        "max_resolution": 4172,
        "min_tokens": 4,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "max_image_pixels": 2**25,  # image_processing_andesvl.DEFAULT_MAX_IMAGE_PIXELS
        "max_image_bytes": 64 * 2**20,  # image_processing_andesvl.DEFAULT_MAX_IMAGE_BYTES
    }


PROCESSOR_CONFIG = {"auto_map": PROCESSOR_AUTO_MAP, "processor_class": "AndesVLProcessor", "allow_remote_images": False}
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "do_sample": True,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "max_new_tokens": 1024,
    "transformers_version": "4.57.6",
}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_repo_files(output: Path, config: dict) -> None:
    """Everything but the weights: code, JSON, tokenizer, chat template, model card, adapters index."""
    output.mkdir(parents=True, exist_ok=True)
    for name in SHARED_FILES:
        if (ROOT / name).resolve() != (output / name).resolve():
            shutil.copy2(ROOT / name, output / name)
    write_json(output / "config.json", config)
    write_json(output / "generation_config.json", GENERATION_CONFIG)
    write_json(output / "preprocessor_config.json", preprocessor_config(config))
    write_json(output / "processor_config.json", PROCESSOR_CONFIG)
    if output.resolve() != ROOT:
        shutil.copy2(ROOT / "README.md", output / "README.md")
        (output / "adapters").mkdir(exist_ok=True)
        shutil.copy2(ROOT / "adapters" / "README.md", output / "adapters" / "README.md")


def _model_class(folder: Path):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module("modeling_andesvl.AndesVLForConditionalGeneration", str(folder))


def expected_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of the model described by `folder/config.json`, built on the meta device."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    with torch.device("meta"):
        model = _model_class(folder)(config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def checkpoint_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of every shard in `weights` (safetensors headers or mmap-ed .bin files; no weights read)."""
    import torch
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(weights.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    if not shapes:
        for shard in sorted(weights.glob("*.bin")):
            state = torch.load(shard, map_location="meta", mmap=True, weights_only=True)
            shapes.update({key: tuple(tensor.shape) for key, tensor in state.items()})
    if not shapes:
        raise FileNotFoundError(f"No *.safetensors or *.bin weights in {weights}.")
    return shapes


def verify_checkpoint(folder: Path, weights: Path) -> dict[str, list[str]]:
    """Compare checkpoint keys/shapes with the model; raise ValueError listing every problem (with counts)."""
    expected, found = expected_shapes(folder), checkpoint_shapes(weights)
    missing = sorted(set(expected) - set(found) - {TIED_KEY})
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {found[k]} vs model {expected[k]}"
        for k in set(found) & set(expected)
        if found[k] != expected[k]
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"Checkpoint {weights} does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} mismatched keys.\nmissing: {missing[:20]}\nunexpected: {unexpected[:20]}\n"
            f"mismatched: {mismatched[:20]}"
        )
    return {"checked_keys": sorted(found)}


def is_weights_file(path: Path) -> bool:
    return path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json")


def copy_weights(weights: Path, output: Path, link: bool) -> list[str]:
    names = []
    for path in sorted(weights.iterdir()):
        if is_weights_file(path):
            target = output / path.name
            if target.exists() or target.is_symlink():
                target.unlink()
            os.symlink(path.resolve(), target) if link else shutil.copy2(path, target)
            names.append(path.name)
    return names


def save_tiny_weights(output: Path, config: dict, seed: int) -> int:
    """Random-init the tiny model described by `config` and save it to `output`; returns its parameter count."""
    import torch
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config_class = get_class_from_dynamic_module("configuration_andesvl.AndesVLConfig", str(ROOT))
    torch.manual_seed(seed)
    model = _model_class(ROOT)(config_class(**config))
    model.save_pretrained(output)
    return sum(p.numel() for p in model.parameters())


def check_paths(output: Path, weights: Path) -> None:
    """Refuse an output folder that is, contains or lies inside the weights folder (it would destroy the input)."""
    if overlap_error(output, weights):
        raise ValueError(
            f"Refusing to build: --output {output} ({output.resolve()}) is, contains or lies inside --weights "
            f"{weights} ({weights.resolve()}); "
            "choose an output folder outside the weights folder."
        )


def _install(staged: Path, output: Path) -> None:
    """Move the verified folder `staged` into an existing `output`: its files replace theirs, weights files of
    `output` that are not in `staged` (stale) are removed, other files stay. All or nothing: on an error, every
    move is undone."""
    backup = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
    moves: list[tuple[Path, Path]] = []  # (source, destination) of every rename done, to undo in reverse
    created: list[Path] = []
    try:
        for path in sorted(output.iterdir()):  # stale weights: files of the old set missing from the new one
            new = staged / path.name
            if (
                is_weights_file(path)
                and (path.is_file() or path.is_symlink())
                and not (new.exists() or new.is_symlink())
            ):
                os.replace(path, backup / path.name)
                moves.append((path, backup / path.name))
        for path in sorted(staged.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                continue
            rel = path.relative_to(staged)
            target = output / rel
            for parent in reversed(rel.parents[:-1]):
                if not (output / parent).is_dir():
                    (output / parent).mkdir()
                    created.append(output / parent)
            if target.exists() or target.is_symlink():
                if target.is_dir() and not target.is_symlink():
                    raise IsADirectoryError(f"{target} is a folder; the new repo has a file there.")
                (backup / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, backup / rel)
                moves.append((target, backup / rel))
            os.replace(path, target)
            moves.append((path, target))
    except BaseException:
        for source, destination in reversed(moves):
            os.replace(destination, source)
        for folder in reversed(created):
            folder.rmdir()
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def build(
    size: str | None,
    tiny: str | None,
    output: Path,
    weights: Path | None,
    link: bool,
    seed: int,
    head_dim: int | None = None,
) -> dict:
    """Write the repo folder `output`. With `weights`, the folder is assembled and verified in a temporary folder
    next to `output` and only then moved into place, so a failure leaves `output` (and `weights`) untouched.
    `head_dim` (tiny only) picks the tiny language model's head size (TINY_HEAD_DIMS)."""
    if head_dim is not None and not tiny:
        raise ValueError("--head-dim applies to --tiny builds only; an official size has its own head_dim (128).")
    config = tiny_config(tiny, head_dim or TINY_TEXT["head_dim"]) if tiny else official_config(size)
    report: dict = {"output": str(output), "model_type": config["model_type"]}
    if not weights:
        if tiny:
            report["tiny_parameters"] = save_tiny_weights(output, config, seed)
        write_repo_files(output, config)  # after save_pretrained: the hand-authored JSON and sources win
        return report
    check_paths(output, weights)
    final = output.resolve()
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"--output {output} exists and is not a folder.")
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        if tiny:
            report["tiny_parameters"] = save_tiny_weights(staged, config, seed)
        write_repo_files(staged, config)
        for path in list(staged.iterdir()):  # the supplied weights replace the random ones, whatever their names
            if is_weights_file(path):
                path.unlink()
        report["weights"] = copy_weights(weights, staged, link)
        report["checked_keys"] = len(verify_checkpoint(staged, staged)["checked_keys"])
        if final.exists():
            _install(staged, final)
        else:
            os.rename(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--size", choices=list(SIZES), help="official AndesVL size to assemble")
    which.add_argument("--tiny", choices=list(TINY_VISION), help="build a tiny random model with this encoder")
    parser.add_argument("--output", type=Path, required=True, help="folder to write (created if needed)")
    parser.add_argument("--weights", type=Path, help="folder with the official *.safetensors or *.bin shards")
    parser.add_argument("--link", action="store_true", help="symlink the weight shards instead of copying them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny random init")
    parser.add_argument(
        "--head-dim", type=int, choices=TINY_HEAD_DIMS, help="head size of the tiny language model (vLLM needs 32)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}))
    report = build(args.size, args.tiny, args.output, args.weights, args.link, args.seed, args.head_dim)
    print(json.dumps({k: v for k, v in report.items() if k != "weights"} | {"weights": len(report.get("weights", []))}))


if __name__ == "__main__":
    sys.exit(main())
