#!/usr/bin/env python3
"""CPU benchmark of AndesVL against transformers' own building blocks, measured side by side in one run.

Figures (select with `--sections`):

- `decode`: steady-state greedy decode tokens/s of a 0.6B-shaped AndesVL (SigLIP2-Base vision + Qwen3-0.6B text)
  with one 448x448 image in the prompt, versus transformers' `Qwen3ForCausalLM` holding the very same text weights,
  prompted with a text-only prompt of the same total length. Ratio target: AndesVL / Qwen3 >= 0.95.
- `vision`: vision-encoder forward time at 448x448 and 896x896, ours (SigLIP2 NaViT-RoPE, sdpa) versus
  transformers' native `Siglip2VisionModel` (sdpa, same widths/depths, no padding), and ours sdpa versus eager.
  Ratio target: ours / native <= 1.10.
- `prefill`: full AndesVL prefill (vision encoder + projector + Qwen3 over the prompt) with one and two 448x448
  images, the vision share, and the section's peak RSS.

Every model is random-init (no downloads), fp32, eval mode, run under `torch.inference_mode()`, seeded. In each
timed repeat the contenders run one after the other (A, B, A, B, ...) so machine noise hits all of them; the JSON
holds every raw sample, the medians and the ratios. The AndesVL classes are loaded from the repo root the way users
load remote code (`get_class_from_dynamic_module`).

Usage:
    python -m andesvl_tools.benchmark                       # full run: ~4 min on 2 idle cores (longer when shared)
    python -m andesvl_tools.benchmark --quick --output /tmp/bench.json          # tiny-model smoke test (< 30 s)
    python -m andesvl_tools.benchmark --sections vision --repeats 5 --threads 4
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList, Qwen3ForCausalLM, Siglip2VisionConfig, Siglip2VisionModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from . import build_repo

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("decode", "vision", "prefill", "adapters", "quant")
IMAGE_START_ID, IMAGE_END_ID = 151652, 151653
TEXT_VOCAB_LIMIT = 151643  # ordinary BPE ids; the special tokens start here

# The AndesVL-0.6B shapes, taken from build_repo (the one place the official sizes are defined), with only the keys
# the benchmark's AndesVL build and its transformers twins (Siglip2VisionModel, Qwen3ForCausalLM) read.
VISION_KEYS = "model_type hidden_size intermediate_size num_hidden_layers num_attention_heads patch_size num_patches"
TEXT_KEYS = (
    "hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size vocab_size"
)
FULL_VISION = {key: build_repo.SIZES["0.6B"][0][key] for key in [*VISION_KEYS.split(), "hidden_act"]}
FULL_TEXT = {
    key: build_repo.SIZES["0.6B"][1][key]
    for key in [*TEXT_KEYS.split(), "tie_word_embeddings", "rope_theta", "max_position_embeddings"]
}
QUICK_VISION = dict(
    model_type="siglip2_navit_rope_model",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=16,
    num_patches=64,
    hidden_act="gelu_pytorch_tanh",
)
QUICK_TEXT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=1e6,
    max_position_embeddings=4096,
)
TINY_TEXT = dict(QUICK_TEXT, vocab_size=1024, num_hidden_layers=1)  # language model carried by vision-only builds

NOTES = {
    "general": "Random-init fp32 models in eval mode under torch.inference_mode(); each repeat runs the contenders "
    "back to back in a fixed order (interleaved), after untimed warm-up calls; figures are medians over --repeats, "
    "raw samples included. Headline ratios are ratios of medians; *_paired_median is the median of the per-round "
    "ratios (robust to load that drifts between rounds) and *_best_runs compares the fastest samples (load from "
    "other processes on a shared machine only ever adds time). Times are time.perf_counter() wall-clock seconds.",
    "decode": "Greedy model.generate(do_sample=False, min_new_tokens=N, max_new_tokens=N) on the full prompt; a "
    "no-op LogitsProcessor stamps time.perf_counter() once per generated token, so the N-1 intervals between the "
    "first and the last stamp are exactly N-1 cached decode steps (forward + generate's per-step overhead), with "
    "the prefill (and, for AndesVL, the vision encoder) excluded without subtracting two noisy runs. "
    "decode_tokens_per_s = 1 / (median over repeats of each run's median step interval), which shrugs off load "
    "bursts from other processes; decode_tokens_per_s_from_mean_step uses each run's (t_last - t_first) / (N-1) "
    "instead. prefill_in_generate_s = t_first - t_call. The Qwen3 baseline "
    "is Qwen3ForCausalLM(andesvl.config.text_config) with andesvl.language_model's state dict, prompted with random "
    "text ids of the same total length as the AndesVL prompt (text + <img> + image pads + </img>). Warm-up: one "
    "2-token generate per model.",
    "vision": "One image per call. Ours: model.vision_encoder(pixel_values [h*w, 3*16*16], image_grid_hw [[h, w]]) "
    "of an AndesVL built with attn_implementation 'sdpa' or 'eager' (same seed, so same weights). Native: "
    "transformers Siglip2VisionModel with the same widths/depths, num_patches = h*w (no padding), "
    "vision_use_head=False (AndesVL has no pooling head), inputs pixel_values [1, h*w, 768], pixel_attention_mask "
    "ones and spatial_shapes [[h, w]], attn_implementation 'sdpa'. Warm-up: one call per contender at the first "
    "resolution only.",
    "prefill": "model(input_ids, pixel_values, image_grid_hw, attention_mask, use_cache=True, logits_to_keep=1), "
    "i.e. exactly generate's prefill step: vision encoder + 2x2 merge + projector + Qwen3 over the whole prompt "
    "(~32 text tokens + per image <img> + 196 pads + </img>). prefill_seconds_per_image = the one-image prefill; "
    "marginal_seconds_per_extra_image = two-image minus one-image median (it includes the language model's cost of the "
    "extra per-image prompt tokens). vision_share = get_image_features time "
    "(one image) / one-image prefill. peak_rss_mb is the process high-water mark over the section, reset at its "
    "start via /proc/self/clear_refs when the kernel allows (else the process-lifetime VmHWM), so it includes "
    "model construction; peak_rss_mb_inference is reset after construction (resident weights + activations).",
    "adapters": "Two non-trivial LoRA adapters (init_lora_weights=False, rank --lora-rank, default targets) on the "
    "same 0.6B-shaped model. switch: set_adapter() alternating between the two resident adapters (per switch) vs "
    "reloading the base from a saved folder plus one adapter (AutoModelForImageTextToText + PeftModel.from_pretrained, "
    "as a server without resident adapters would). memory_per_resident_adapter_mb counts the LoRA parameters of one "
    "adapter; rss_delta_two_adapters_mb is the process RSS growth when both are added. mixed_batch: 4 text-only rows "
    "with adapter_names ['ocr', 'gui', '__base__', 'ocr'] in one generate() vs one generate() per adapter group "
    "(set_adapter / disable_adapter between them); throughput = generated tokens / wall time.",
    "quant": "The same model (text shape --text-size, 0.6B unless given; --text-layers builds only the first N "
    "decoder layers, embedding and LM head in full) in fp32, bf16 (.to) and weight-only int8 / int4 "
    "(quantization_andesvl.quantize_model, language-model projections; 'variants' says what each one is): the "
    "fp16-scale ones dequantize each weight in every forward, the *_kernel ones (bf16 scales, bf16 model) read the "
    "packed codes through torch's CPU kernels for decode steps and multiply the dequantized weight block by block "
    "for the prompt, in prompt_matmul_dtype (bf16 on a CPU with AMX tiles or AVX-512 BF16, else fp32); *_head also "
    "quantizes the LM head (untied; the embedding lookup stays float). Decode tokens/s as in "
    "'decode' (text-only prompt of --prompt-tokens); prefill_s = the prompt's forward in generate. "
    "decode_weight_mb_per_token = bytes one decode step must read (decoder layers + final norm + the LM head in "
    "full; for the kernel rows the kernels' own layout: int3 codes run as a 4-bit copy); model_weight_mb = the saved "
    "state; resident_weight_mb = that plus the kernel layouts built on top of it; roofline_tokens_per_s = measured "
    "read bandwidth (sum over a 512 MB fp32 tensor) / those bytes; "
    "fraction_of_roofline = measured / roofline. With --llama-cpp: the same Qwen3 weights (transformers' "
    "Qwen3ForCausalLM folder) converted by llama.cpp's convert_hf_to_gguf.py to F32 / BF16 and quantized by "
    "llama-quantize to Q8_0 / Q4_0 / Q3_K_S, timed by llama-bench with the same thread count in the same interleaved "
    "rounds (decode: -n decode_tokens -d prompt_tokens; prefill: -p prompt_tokens); their bytes per token = the GGUF "
    "file size. ratio_X_over_llama_cpp_Y_* are paired medians (tokens/s: ours / theirs; prefill_s: ours / theirs). "
    "memory (--variant-rss, on by default): after the timed rounds each variant is saved as a loadable folder and a "
    "fresh Python process loads it with AutoModelForImageTextToText (trust_remote_code, dtype='auto') and runs one "
    "greedy generate of the same prompt and new tokens; peak_rss_mb is that process's VmHWM (imports, loading, "
    "the kernel layouts built on the first decode step, activations), peak_rss_over_imports_mb subtracts its RSS once "
    "torch and transformers are imported (the same for every variant).",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("outputs/benchmark.json"),
        metavar="PATH",
        help="JSON file to write (default outputs/benchmark.json).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for weights and inputs (default 0).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per contender; medians are reported.")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2).")
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=None,
        help="New tokens per generate() in `decode` (default 32; 8 with --quick).",
    )
    parser.add_argument("--prompt-tokens", type=int, default=32, help="Text tokens in the prompt (besides images).")
    parser.add_argument("--lora-rank", type=int, default=16, help="Rank of the two benchmark LoRA adapters.")
    parser.add_argument("--quick", action="store_true", help="Tiny widths/depths and small images: a smoke test.")
    parser.add_argument(
        "--text-size", choices=tuple(build_repo.SIZES), default="0.6B", help="Text model shape of `quant` (0.6B)."
    )
    parser.add_argument("--text-layers", type=int, help="`quant`: build only this many decoder layers (memory).")
    parser.add_argument(
        "--quant-variants",
        default=",".join(QUANT_VARIANTS),
        help=f"Comma-separated subset of {','.join(QUANT_VARIANTS)} for `quant` (the fp32 model is always built).",
    )
    parser.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="DIR",
        help="`quant`: also time llama.cpp (F32, BF16, Q8_0, Q4_0, Q3_K_S GGUF of the same Qwen3 weights, "
        "llama-bench with the same threads) from this built llama.cpp tree (scripts/build_llama_cpp.sh)",
    )
    parser.add_argument(
        "--variant-rss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="`quant`: peak RSS of each variant, in a fresh process that loads its saved folder and decodes.",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {','.join(SECTIONS)}."
    )
    parser.add_argument("--rss-child", type=Path, metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.decode_tokens is None:
        args.decode_tokens = 8 if args.quick else 32
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.quant_variants = [v.strip() for v in args.quant_variants.split(",") if v.strip()]
    if sorted(set(args.quant_variants) - set(QUANT_VARIANTS)):
        parser.error(f"unknown --quant-variants {sorted(set(args.quant_variants) - set(QUANT_VARIANTS))}")
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.repeats < 1 or args.decode_tokens < 2:
        parser.error("--repeats must be >= 1 and --decode-tokens >= 2")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------------


def andesvl_classes() -> tuple[type, type]:
    config_cls = get_class_from_dynamic_module("configuration_andesvl.AndesVLConfig", str(REPO_ROOT))
    model_cls = get_class_from_dynamic_module("modeling_andesvl.AndesVLForConditionalGeneration", str(REPO_ROOT))
    return config_cls, model_cls


def build_andesvl(vision: dict, text: dict, attn: str, seed: int) -> torch.nn.Module:
    config_cls, model_cls = andesvl_classes()
    config = config_cls(vision_config=dict(vision), text_config=dict(text), attn_implementation=attn)
    torch.manual_seed(seed)
    return model_cls(config).float().eval()


def build_qwen3_twin(andesvl: torch.nn.Module) -> torch.nn.Module:
    """transformers' own Qwen3ForCausalLM with exactly the AndesVL language model's weights."""
    twin = Qwen3ForCausalLM(andesvl.config.text_config)
    twin.load_state_dict(andesvl.language_model.state_dict())
    return twin.float().eval()


def build_native_siglip2(vision: dict, num_patches: int, seed: int) -> torch.nn.Module:
    fields = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "patch_size",
        "hidden_act",
    )
    config = Siglip2VisionConfig(
        **{k: vision[k] for k in fields}, num_patches=num_patches, vision_use_head=False, attn_implementation="sdpa"
    )
    torch.manual_seed(seed)
    return Siglip2VisionModel(config).float().eval()


def image_grid(resolution: int, patch: int) -> tuple[int, int]:
    return resolution // patch, resolution // patch


def packed_images(grids: list[tuple[int, int]], patch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed patches [sum h*w, 3*p*p] and image_grid_hw [num_images, 2] (block order is irrelevant here)."""
    generator = torch.Generator().manual_seed(seed)
    num_patches = sum(h * w for h, w in grids)
    return torch.randn(num_patches, 3 * patch * patch, generator=generator), torch.tensor(grids, dtype=torch.long)


def prompt_ids(image_tokens: list[int], text_tokens: int, image_token_id: int, seed: int) -> torch.Tensor:
    """[1, S]: half the text, then `<img> pads </img>` per image, then the other half of the text."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, TEXT_VOCAB_LIMIT, (text_tokens,), generator=generator).tolist()
    head, tail = text[: text_tokens // 2], text[text_tokens // 2 :]
    images = [tok for n in image_tokens for tok in [IMAGE_START_ID] + [image_token_id] * n + [IMAGE_END_ID]]
    return torch.tensor([head + images + tail], dtype=torch.long)


def text_prompt_ids(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, TEXT_VOCAB_LIMIT, (1, length), generator=generator)


# ----------------------------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_interleaved(
    contenders: dict[str, Callable[[], float]], repeats: int, warmups: dict[str, Callable] | None = None
) -> dict[str, list[float]]:
    """Untimed warm-ups (default: each contender once), then `repeats` rounds of A, B, ...; each callable returns
    its own seconds, so a contender may time only part of what it runs."""
    for fn in (contenders if warmups is None else warmups).values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(fn())
    return samples


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-round ratios: both contenders of a round ran back to back, under the same machine load."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "samples": [round(s, 6) for s in samples]}


class StepTimer(LogitsProcessor):
    """No-op logits processor that stamps the wall clock once per generated token (after each forward)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores


def generate_timing(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int) -> dict[str, float]:
    """One greedy generate(); returns the decode seconds per token and the prefill seconds."""
    timer = StepTimer()
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        do_sample=False,
        min_new_tokens=new_tokens,
        max_new_tokens=new_tokens,
        logits_processor=LogitsProcessorList([timer]),
        pad_token_id=0,
    )
    generated = output.shape[1] - inputs["input_ids"].shape[1]
    if generated != new_tokens or len(timer.stamps) != new_tokens:
        raise RuntimeError(f"generate produced {generated} tokens / {len(timer.stamps)} steps, expected {new_tokens}")
    steps = [later - earlier for earlier, later in zip(timer.stamps, timer.stamps[1:])]
    return {
        "step_median_s": statistics.median(steps),  # robust to load bursts shorter than half the run
        "step_mean_s": (timer.stamps[-1] - timer.stamps[0]) / (new_tokens - 1),
        "prefill_s": timer.stamps[0] - start,
    }


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM), MB. Not ru_maxrss: Linux carries the spawning process's high-water
    mark over exec into it, so a child started by a large parent would report the parent's peak."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------


def decode_inputs(andesvl: torch.nn.Module, args: argparse.Namespace, resolution: int) -> tuple[dict, dict]:
    config = andesvl.config
    patch = config.vision_config.patch_size
    grid = image_grid(resolution, patch)
    pixel_values, grid_hw = packed_images([grid], patch, args.seed)
    image_tokens = grid[0] * grid[1] // config.image_token_group
    ids = prompt_ids([image_tokens], args.prompt_tokens, config.image_token_id, args.seed)
    vlm = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values, image_grid_hw=grid_hw)
    text_ids = text_prompt_ids(ids.shape[1], args.seed)
    return vlm, dict(input_ids=text_ids, attention_mask=torch.ones_like(text_ids))


def same_weights_check(andesvl: torch.nn.Module, qwen3: torch.nn.Module, seed: int) -> float:
    """Max |logit difference| of the two language models on a short text-only prompt (should be ~0)."""
    ids = text_prompt_ids(8, seed + 7)
    return float((andesvl(input_ids=ids).logits - qwen3(input_ids=ids).logits).abs().max())


def decode_summary(runs: dict[str, list[dict]], samples: dict[str, list[float]]) -> dict[str, Any]:
    """Per-model rates (median-step and mean-step based) and the AndesVL / Qwen3 ratios."""
    result: dict[str, Any] = {}
    for name in runs:
        means = [r["step_mean_s"] for r in runs[name]]
        result[name] = {
            "decode_tokens_per_s": 1.0 / statistics.median(samples[name]),
            "decode_tokens_per_s_from_mean_step": 1.0 / statistics.median(means),
            "decode_step_median_s": summary(samples[name]),
            "decode_step_mean_s": summary(means),
            "prefill_in_generate_s": summary([r["prefill_s"] for r in runs[name]]),
        }
    rates = {name: result[name]["decode_tokens_per_s"] for name in runs}
    result["ratio_andesvl_over_qwen3"] = rates["andesvl"] / rates["qwen3"]
    result["ratio_from_mean_step"] = (
        result["andesvl"]["decode_tokens_per_s_from_mean_step"] / result["qwen3"]["decode_tokens_per_s_from_mean_step"]
    )
    result["ratio_paired_median"] = paired_ratio(samples["qwen3"], samples["andesvl"])
    result["ratio_of_best_runs"] = min(samples["qwen3"]) / min(samples["andesvl"])  # noise only ever adds time
    return result


def time_decode(args: argparse.Namespace) -> dict[str, Any]:
    vision, text = (QUICK_VISION, QUICK_TEXT) if args.quick else (FULL_VISION, FULL_TEXT)
    resolution = 128 if args.quick else 448
    andesvl = build_andesvl(vision, text, "sdpa", args.seed)
    qwen3 = build_qwen3_twin(andesvl)
    vlm_inputs, text_inputs = decode_inputs(andesvl, args, resolution)
    runs: dict[str, list[dict]] = {"andesvl": [], "qwen3": []}

    def contender(name: str, model: torch.nn.Module, inputs: dict) -> Callable[[], float]:
        def run() -> float:
            runs[name].append(generate_timing(model, inputs, args.decode_tokens))
            return runs[name][-1]["step_median_s"]

        return run

    inputs = {"andesvl": (andesvl, vlm_inputs), "qwen3": (qwen3, text_inputs)}
    warmups = {name: (lambda m=m, i=i: generate_timing(m, i, 2)) for name, (m, i) in inputs.items()}
    samples = run_interleaved({name: contender(name, *mi) for name, mi in inputs.items()}, args.repeats, warmups)
    result: dict[str, Any] = {
        "image_resolution": resolution,
        "context_tokens": int(vlm_inputs["input_ids"].shape[1]),
        "image_tokens": int((vlm_inputs["input_ids"] == andesvl.config.image_token_id).sum()),
        "decode_tokens": args.decode_tokens,
        "max_abs_logit_diff_same_weights": same_weights_check(andesvl, qwen3, args.seed),
    }
    result.update(decode_summary(runs, samples))
    result["target"] = ">= 0.95"
    result["meets_target"] = result["ratio_andesvl_over_qwen3"] >= 0.95
    return result


def vision_contenders(vision: dict, resolution: int, ours: dict[str, torch.nn.Module], seed: int) -> dict:
    patch = vision["patch_size"]
    h, w = image_grid(resolution, patch)
    pixel_values, grid_hw = packed_images([(h, w)], patch, seed)
    native = build_native_siglip2(vision, h * w, seed)
    native_inputs = dict(
        pixel_values=pixel_values[None],
        pixel_attention_mask=torch.ones(1, h * w, dtype=torch.long),
        spatial_shapes=torch.tensor([[h, w]], dtype=torch.long),
    )
    return {
        "ours_sdpa": lambda: timed(lambda: ours["sdpa"](pixel_values, grid_hw)),
        "siglip2_sdpa": lambda: timed(lambda: native(**native_inputs)),
        "ours_eager": lambda: timed(lambda: ours["eager"](pixel_values, grid_hw)),
    }


def time_vision(args: argparse.Namespace) -> dict[str, Any]:
    vision = QUICK_VISION if args.quick else FULL_VISION
    resolutions = (128, 256) if args.quick else (448, 896)
    ours = {attn: build_andesvl(vision, TINY_TEXT, attn, args.seed).vision_encoder for attn in ("sdpa", "eager")}
    result: dict[str, Any] = {"target_ours_over_siglip2": "<= 1.10"}
    for index, resolution in enumerate(resolutions):
        contenders = vision_contenders(vision, resolution, ours, args.seed)
        samples = run_interleaved(contenders, args.repeats, None if index == 0 else {})  # warm up once per section
        medians = {name: statistics.median(values) for name, values in samples.items()}
        best = {name: min(values) for name, values in samples.items()}
        h, w = image_grid(resolution, vision["patch_size"])
        result[f"{resolution}x{resolution}"] = {
            "patches": h * w,
            **{f"{name}_s": summary(values) for name, values in samples.items()},
            "ratio_ours_over_siglip2": medians["ours_sdpa"] / medians["siglip2_sdpa"],
            "ratio_sdpa_over_eager": medians["ours_sdpa"] / medians["ours_eager"],
            "ratio_ours_over_siglip2_paired_median": paired_ratio(samples["ours_sdpa"], samples["siglip2_sdpa"]),
            "ratio_ours_over_siglip2_best_runs": best["ours_sdpa"] / best["siglip2_sdpa"],
            "meets_target": medians["ours_sdpa"] / medians["siglip2_sdpa"] <= 1.10,
        }
        gc.collect()
    return result


def prefill_contenders(model: torch.nn.Module, args: argparse.Namespace, resolution: int) -> dict:
    config = model.config
    patch = config.vision_config.patch_size
    grid = image_grid(resolution, patch)
    per_image = grid[0] * grid[1] // config.image_token_group
    contenders = {}
    for count in (1, 2):
        pixel_values, grid_hw = packed_images([grid] * count, patch, args.seed)
        ids = prompt_ids([per_image] * count, args.prompt_tokens, config.image_token_id, args.seed)
        inputs = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixel_values,
            image_grid_hw=grid_hw,
            use_cache=True,
            logits_to_keep=1,
        )
        contenders[f"prefill_{count}_image"] = (lambda inp: lambda: timed(lambda: model(**inp)))(inputs)
        if count == 1:
            contenders["vision_features_1_image"] = lambda pv=pixel_values, g=grid_hw: timed(
                lambda: model.get_image_features(pv, g)
            )
    return contenders


def time_prefill(args: argparse.Namespace) -> dict[str, Any]:
    vision, text = (QUICK_VISION, QUICK_TEXT) if args.quick else (FULL_VISION, FULL_TEXT)
    resolution = 128 if args.quick else 448
    model = build_andesvl(vision, text, "sdpa", args.seed)
    per_image = (resolution // vision["patch_size"]) ** 2 // model.config.image_token_group
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    construction_peak = peak_rss_mb()
    reset = reset_peak_rss()  # from here on: resident model + inference activations, not construction transients
    samples = run_interleaved(prefill_contenders(model, args, resolution), args.repeats)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "image_resolution": resolution,
        "context_tokens": {f"{n}_image": args.prompt_tokens + n * (per_image + 2) for n in (1, 2)},
        "weights_mb": weights_mb,
        "peak_rss_mb_construction": construction_peak,
        "peak_rss_mb_inference": peak_rss_mb() if reset else None,
        **{f"{name}_s": summary(values) for name, values in samples.items()},
        "prefill_seconds_per_image": medians["prefill_1_image"],
        "marginal_seconds_per_extra_image": medians["prefill_2_image"] - medians["prefill_1_image"],
        "vision_share_of_1_image_prefill": medians["vision_features_1_image"] / medians["prefill_1_image"],
    }


# ----------------------------------------------------------------------------------------------------------------------
# 1+N adapters and the quantized base
# ----------------------------------------------------------------------------------------------------------------------

ADAPTER_NAMES = ("ocr", "gui")


def add_lora_adapters(model: torch.nn.Module, rank: int, seed: int):
    """A PeftModel with non-trivial (B != 0) adapters named ADAPTER_NAMES on the default LoRA targets."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=model.default_lora_target_modules
    )
    peft_model = get_peft_model(model, model.register_lora_layers(config), adapter_name=ADAPTER_NAMES[0])
    for name in ADAPTER_NAMES[1:]:
        peft_model.add_adapter(name, config)
    return peft_model.eval()


def adapter_bytes(model: torch.nn.Module, name: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{name}." in n)


def time_switch_vs_reload(peft_model, folder: Path, repeats: int) -> dict[str, Any]:
    """set_adapter() between two resident adapters vs loading the base from disk again (+ its adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    def switch() -> float:
        return timed(lambda: [peft_model.set_adapter(name) for name in ADAPTER_NAMES]) / len(ADAPTER_NAMES)

    def reload() -> float:
        def load():
            base = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
            PeftModel.from_pretrained(base, folder / "adapters" / ADAPTER_NAMES[0])

        return timed(load)

    samples = run_interleaved({"set_adapter": switch, "reload": reload}, repeats)
    return {name: summary(values) for name, values in samples.items()} | {
        "ratio_reload_over_set_adapter": statistics.median(samples["reload"])
        / statistics.median(samples["set_adapter"])
    }


def time_mixed_batch(peft_model, text_length: int, new_tokens: int, repeats: int, seed: int) -> dict[str, Any]:
    """4 rows, each with its own adapter (or the base), in one generate() vs one generate() per adapter group."""
    rows = ["ocr", "gui", "__base__", "ocr"]
    ids = torch.cat([text_prompt_ids(text_length, seed + row) for row in range(len(rows))])
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)

    def mixed() -> float:
        return timed(
            lambda: peft_model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=rows, **kwargs
            )
        )

    def grouped() -> float:
        def run():
            for name in dict.fromkeys(rows):
                index = [i for i, row in enumerate(rows) if row == name]
                peft_model.set_adapter(name) if name != "__base__" else None
                context = peft_model.disable_adapter() if name == "__base__" else contextlib.nullcontext()
                with context:
                    peft_model.generate(input_ids=ids[index], attention_mask=torch.ones_like(ids[index]), **kwargs)

        return timed(run)

    samples = run_interleaved({"mixed_batch": mixed, "adapter_by_adapter": grouped}, repeats)
    tokens = len(rows) * new_tokens
    throughput = {name: tokens / statistics.median(values) for name, values in samples.items()}
    return {
        "rows": rows,
        "new_tokens_per_row": new_tokens,
        "prompt_tokens": text_length,
        "seconds": {name: summary(values) for name, values in samples.items()},
        "tokens_per_s": throughput,
        "ratio_mixed_over_adapter_by_adapter_throughput": throughput["mixed_batch"] / throughput["adapter_by_adapter"],
    }


def time_adapters(args: argparse.Namespace) -> dict[str, Any]:
    vision, text = (QUICK_VISION, QUICK_TEXT) if args.quick else (FULL_VISION, FULL_TEXT)
    model = build_andesvl(vision, text, "sdpa", args.seed)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "AndesVL-bench"
        save_loadable(model, folder)
        rss_base = current_rss_mb()
        peft_model = add_lora_adapters(model, rank=args.lora_rank, seed=args.seed)
        rss_adapters = current_rss_mb()
        peft_model.save_pretrained(folder / "adapters")  # non-default adapter names go to adapters/<name>/
        switch = time_switch_vs_reload(peft_model, folder, args.repeats)
    mixed = time_mixed_batch(peft_model, args.prompt_tokens, max(4, args.decode_tokens // 2), args.repeats, args.seed)
    per_adapter = {name: adapter_bytes(peft_model, name) for name in ADAPTER_NAMES}
    return {
        "lora_rank": args.lora_rank,
        "base_parameter_mb": base_bytes / 2**20,
        "memory_per_resident_adapter_mb": {name: size / 2**20 for name, size in per_adapter.items()},
        "memory_per_resident_adapter_fraction_of_base": {name: size / base_bytes for name, size in per_adapter.items()},
        "rss_delta_two_adapters_mb": rss_adapters - rss_base,
        "switch": switch,
        "mixed_batch": mixed,
    }


def save_loadable(model: torch.nn.Module, folder: Path) -> None:
    """save_pretrained plus the remote code and auto_map, so the Auto classes can load the folder."""

    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"auto_map": build_repo.AUTO_MAP}))
    for name in build_repo.REMOTE_CODE_FILES:
        shutil.copy2(REPO_ROOT / name, folder / name)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_bandwidth_gb_s(repeats: int, megabytes: int = 512) -> float:
    """Sustained read bandwidth: median time of summing a `megabytes` fp32 tensor (larger than any cache)."""
    data = torch.rand(megabytes * 2**20 // 4)
    data.sum()
    return data.numel() * 4 / statistics.median(timed(data.sum) for _ in range(max(3, repeats))) / 1e9


def tensor_bytes(tensors) -> int:
    unique = {id(t): t for t in tensors}.values()
    return sum(t.numel() * t.element_size() for t in unique)


def decode_read_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """What a decode step reads of `module`: a quantized layer's kernel layout where one was built (the int4 kernel
    reads its own 4-bit copy and scales + zero points, not `qweight` / `scales`) plus its bias, else its tensors."""
    layouts = module.kernel_layout_tensors() if hasattr(module, "kernel_layout_tensors") else []
    if layouts:
        return [*layouts, *([module.bias] if module.bias is not None else [])]
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: the language model's layers and norm, plus the LM head in full (float
    and tied, or quantized codes and scales, as the kernel lays them out); the embedding lookup reads one row and the
    vision tower does not run. Call it after a decode step (the kernel layouts are built on first use)."""
    language_model = model.language_model
    modules = (language_model.model.layers, language_model.model.norm, language_model.lm_head)
    return tensor_bytes(t for module in modules for sub in module.modules() for t in decode_read_tensors(sub))


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Every weight the model holds after decoding: parameters and buffers plus the kernel layouts built on top."""
    layouts = [
        t
        for module in model.modules()
        if hasattr(module, "kernel_layout_tensors")
        for t in module.kernel_layout_tensors()
    ]
    return tensor_bytes([*model.parameters(), *model.buffers(), *layouts])


# name -> (what it is, compute dtype, quantize_model arguments or None); the *_kernel ones decode on torch's packed
# CPU kernels (bf16 scales, bf16 activations), the others dequantize every weight in every forward
FP16_SCALES, BF16_SCALES = dict(scale_dtype="float16"), dict(scale_dtype="bfloat16")
QUANT_VARIANTS: dict[str, tuple[str, torch.dtype, dict[str, Any] | None]] = {
    "fp32": ("fp32", torch.float32, None),
    "bf16": ("bf16 (.to)", torch.bfloat16, None),
    "int8": ("int8, group 64, fp16 scales, fp32 model", torch.float32, dict(bits=8, group_size=64, **FP16_SCALES)),
    "int4": ("int4, group 64, fp16 scales, fp32 model", torch.float32, dict(bits=4, group_size=64, **FP16_SCALES)),
    "int8_kernel": (
        "int8, one bf16 scale per row, bf16 model: torch's int8 kernel",
        torch.bfloat16,
        dict(bits=8, group_size=-1, **BF16_SCALES),
    ),
    "int4_kernel": (
        "int4, group 64, bf16 scales, bf16 model: torch's int4 kernel",
        torch.bfloat16,
        dict(bits=4, group_size=64, **BF16_SCALES),
    ),
    "int8_kernel_head": (
        "int8_kernel plus the LM head (--lm-head)",
        torch.bfloat16,
        dict(bits=8, group_size=-1, lm_head=True, **BF16_SCALES),
    ),
    "int4_kernel_head": (
        "int4_kernel plus the LM head (--lm-head)",
        torch.bfloat16,
        dict(bits=4, group_size=64, lm_head=True, **BF16_SCALES),
    ),
    "int3_kernel_head": (
        "int3, group 64, bf16 scales, LM head too (3.25 bits per weight saved), bf16 model: on torch's int4 kernel",
        torch.bfloat16,
        dict(bits=3, group_size=64, lm_head=True, **BF16_SCALES),
    ),
}


def prefill_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The dtype the quantized layers multiply a prompt of `input_dtype` in on this CPU."""
    return get_class_from_dynamic_module("quantization_andesvl.prefill_dtype", str(REPO_ROOT))(input_dtype)


def quantized_variants(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    """The fp32 `model` itself and, for every other name, a copy cast and quantized as QUANT_VARIANTS says. Each dtype
    is cast once and the quantized variants copy that cast (a bf16 copy, not a second fp32 one: the 4B shape's
    variants fit in 24 GB)."""
    quantize_model = get_class_from_dynamic_module("quantization_andesvl.quantize_model", str(REPO_ROOT))
    casts: dict[torch.dtype, torch.nn.Module] = {torch.float32: model}
    variants = {}
    for name in names:
        _, dtype, spec = QUANT_VARIANTS[name]
        if dtype not in casts:
            casts[dtype] = copy.deepcopy(model).to(dtype)
        if spec is None:
            variants[name] = casts[dtype]
            continue
        variant = copy.deepcopy(casts[dtype])
        quantize_model(variant, **spec)
        variants[name] = variant
    return variants


def rss_child(args: argparse.Namespace) -> None:
    """In a fresh process: load the saved variant `args.rss_child` the way a user does (Auto class, remote code,
    `dtype="auto"`), run one greedy generate of the quant section's prompt, print its memory as one JSON line."""
    from transformers import AutoModelForImageTextToText

    baseline = current_rss_mb()  # torch + transformers imported: the same for every variant
    model = AutoModelForImageTextToText.from_pretrained(args.rss_child, trust_remote_code=True, dtype="auto").eval()
    loaded = current_rss_mb()
    ids = text_prompt_ids(args.prompt_tokens, args.seed)
    with torch.inference_mode():
        generate_timing(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids)), args.decode_tokens)
    peak = peak_rss_mb()
    memory = {"rss_after_imports_mb": baseline, "rss_after_load_mb": loaded, "peak_rss_mb": peak}
    print(json.dumps(memory | {"peak_rss_over_imports_mb": peak - baseline, "dtype": str(model.dtype)}))


def variant_peak_rss(model: torch.nn.Module, args: argparse.Namespace, tokens: int, workdir: Path) -> dict[str, Any]:
    """Save `model` as a loadable folder, measure it with `rss_child` in a fresh process, remove the folder."""
    folder = workdir / "variant"
    save_loadable(model, folder)
    command = [sys.executable, "-m", "andesvl_tools.benchmark", "--threads", str(args.threads)]
    command += ["--seed", str(args.seed), "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(tokens)]
    try:
        result = subprocess.run([*command, "--rss-child", str(folder)], capture_output=True, text=True, cwd=REPO_ROOT)
    finally:
        shutil.rmtree(folder)
    if result.returncode:
        raise RuntimeError(f"peak-RSS child for {folder} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# llama.cpp on the same Qwen3 weights (--llama-cpp DIR: a built llama.cpp tree, see scripts/build_llama_cpp.sh)
# ----------------------------------------------------------------------------------------------------------------------

LLAMA_CPP_TYPES = ("F32", "BF16", "Q8_0", "Q4_0", "Q3_K_S")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json")


def llama_cpp_tools(root: Path) -> dict[str, Path]:
    tools = {
        "convert": root / "convert_hf_to_gguf.py",
        "quantize": root / "build" / "bin" / "llama-quantize",
        "bench": root / "build" / "bin" / "llama-bench",
    }
    missing = [str(path) for path in tools.values() if not path.exists()]
    if missing:
        raise SystemExit(f"--llama-cpp {root}: missing {missing}; build it with scripts/build_llama_cpp.sh")
    return tools


def export_gguf(model: torch.nn.Module, tools: dict[str, Path], folder: Path) -> dict[str, Path]:
    """The AndesVL language model as transformers' Qwen3ForCausalLM folder -> GGUF F32 / BF16 (convert_hf_to_gguf.py)
    -> Q8_0 / Q4_0 / Q3_K_S (llama-quantize, from the F32 file)."""
    hf_folder = folder / "qwen3"
    build_qwen3_twin(model).save_pretrained(hf_folder)
    for name in TOKENIZER_FILES:
        shutil.copy2(REPO_ROOT / name, hf_folder / name)
    files = {kind: folder / f"qwen3-{kind.lower()}.gguf" for kind in LLAMA_CPP_TYPES}
    for kind in ("F32", "BF16"):
        command = [sys.executable, str(tools["convert"]), str(hf_folder), "--outtype", kind.lower()]
        subprocess.run([*command, "--outfile", str(files[kind])], check=True, capture_output=True)
    for kind in LLAMA_CPP_TYPES[2:]:
        command = [str(tools["quantize"]), str(files["F32"]), str(files[kind]), kind]
        subprocess.run(command, check=True, capture_output=True)
    return files


def llama_bench(tools: dict[str, Path], gguf: Path, threads: int, prompt: int, depth: int, new: int) -> dict:
    """One llama-bench test (-r 1): prompt processing of `prompt` tokens, or `new` generated tokens after `depth`."""
    command = [str(tools["bench"]), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    command += ["-p", str(prompt), "-n", str(new), "-d", str(depth)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout)[0]


def quant_text_shape(args: argparse.Namespace) -> dict[str, Any]:
    """The text model of `--text-size` (all its layers, or the first `--text-layers`); tiny with --quick."""
    if args.quick:
        return dict(QUICK_TEXT)
    text = {key: build_repo.SIZES[args.text_size][1][key] for key in FULL_TEXT}
    if args.text_layers:
        text["num_hidden_layers"] = args.text_layers
    return text


# ours -> the llama.cpp file of the same bits (llama.cpp keeps the tied output matrix at 6 bits in Q4_0: Q6_K)
LLAMA_CPP_PEERS = {
    "fp32": "F32",
    "bf16": "BF16",
    "int8_kernel": "Q8_0",
    "int8_kernel_head": "Q8_0",
    "int4_kernel": "Q4_0",
    "int4_kernel_head": "Q4_0",
    "int3_kernel_head": "Q3_K_S",
}


def time_quant(args: argparse.Namespace) -> dict[str, Any]:
    tools = llama_cpp_tools(args.llama_cpp) if args.llama_cpp else None
    vision, text = (QUICK_VISION if args.quick else FULL_VISION), quant_text_shape(args)
    model = build_andesvl(vision, text, "sdpa", args.seed)
    ids = text_prompt_ids(args.prompt_tokens, args.seed)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    tokens = max(4, args.decode_tokens // 2)
    with tempfile.TemporaryDirectory(prefix="andesvl-llama-cpp-") as workdir:  # the GGUF files, removed on any exit
        gguf = export_gguf(model, tools, Path(workdir)) if tools else {}
        gguf_bytes = {kind: path.stat().st_size for kind, path in gguf.items()}
        variants = quantized_variants(model, args.quant_variants)
        prefill: dict[str, list[float]] = {name: [] for name in [*variants, *gguf]}  # prompt seconds, per call

        def decode_step_s(name: str, model: torch.nn.Module) -> float:
            timing = generate_timing(model, inputs, tokens)
            prefill[name].append(timing["prefill_s"])
            return timing["step_median_s"]

        def llama_step_s(kind: str) -> float:
            prompt = llama_bench(tools, gguf[kind], args.threads, args.prompt_tokens, 0, 0)
            prefill[kind].append(prompt["avg_ns"] / 1e9)
            return 1 / llama_bench(tools, gguf[kind], args.threads, 0, args.prompt_tokens, tokens)["avg_ts"]

        contenders = {name: (lambda n=name, m=model: decode_step_s(n, m)) for name, model in variants.items()}
        contenders |= {kind: (lambda k=kind: llama_step_s(k)) for kind in gguf}
        samples = run_interleaved(contenders, args.repeats)
    bandwidth = measure_bandwidth_gb_s(args.repeats)
    result: dict[str, Any] = {
        "text_shape": {"size": None if args.quick else args.text_size, **text},
        "decode_tokens": tokens,
        "prompt_tokens": args.prompt_tokens,
        "memory_bandwidth_gb_s": bandwidth,
        "prompt_matmul_dtype": str(prefill_dtype(torch.bfloat16)).removeprefix("torch."),
        "variants": {name: QUANT_VARIANTS[name][0] for name in variants},
    }
    memory = {}
    if args.variant_rss:  # after the timed rounds, one variant at a time, each in a process of its own
        with tempfile.TemporaryDirectory(prefix="andesvl-variant-rss-") as workdir:
            memory = {name: variant_peak_rss(model, args, tokens, Path(workdir)) for name, model in variants.items()}
    for name in contenders:
        per_token = statistics.median(samples[name])
        prompt_s = prefill[name][1:]  # the timed rounds (the first call is the warm-up)
        if name in variants:
            weight_mb = tensor_bytes([*variants[name].parameters(), *variants[name].buffers()]) / 2**20
            resident_mb = resident_weight_bytes(variants[name]) / 2**20
            weight_bytes = decode_weight_bytes(variants[name])
        else:  # llama.cpp: the GGUF file is the text model's weights (+ a small header), mapped as it is
            weight_bytes = gguf_bytes[name]
            weight_mb = resident_mb = weight_bytes / 2**20
        roofline = bandwidth * 1e9 / weight_bytes
        result[name] = {
            "decode_tokens_per_s": 1 / per_token,
            "decode_s_per_token": summary(samples[name]),
            "model_weight_mb": weight_mb,
            "resident_weight_mb": resident_mb,
            "decode_weight_mb_per_token": weight_bytes / 2**20,
            "roofline_tokens_per_s": roofline,
            "fraction_of_roofline": (1 / per_token) / roofline,
            "prefill_s": summary(prompt_s),
        }
        if name in memory:
            result[name]["memory"] = memory[name]
    for name in variants:
        for base in ("fp32", "bf16"):
            if base in variants and name != base:
                ratio = result[name]["decode_tokens_per_s"] / result[base]["decode_tokens_per_s"]
                result[f"ratio_{name}_over_{base}_tokens_per_s"] = ratio
                result[f"ratio_{name}_over_{base}_prefill_s"] = paired_ratio(prefill[name][1:], prefill[base][1:])
                if base == "fp32":
                    ratio = result[name]["model_weight_mb"] / result["fp32"]["model_weight_mb"]
                    result[f"ratio_{name}_over_fp32_weight_memory"] = ratio
                if memory:
                    ratio = memory[name]["peak_rss_mb"] / memory[base]["peak_rss_mb"]
                    result[f"ratio_{name}_over_{base}_peak_rss"] = ratio
        peer = LLAMA_CPP_PEERS.get(name)
        if peer in gguf:
            result[f"ratio_{name}_over_llama_cpp_{peer}_tokens_per_s"] = paired_ratio(samples[peer], samples[name])
            result[f"ratio_{name}_over_llama_cpp_{peer}_prefill_s"] = paired_ratio(prefill[name][1:], prefill[peer][1:])
    if gguf:
        bench = subprocess.run([str(tools["bench"]), "--version"], capture_output=True, text=True)
        result["llama_cpp"] = {"root": str(args.llama_cpp), "version": (bench.stdout + bench.stderr).strip()}
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_info() -> dict[str, Any]:
    """The CPU model and the vector extensions the kernels can use (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "vector_extensions": [flag for flag in VECTOR_FLAGS if flag in flags]}


def environment_info(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "cpu": cpu_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }


def run_section(name: str, args: argparse.Namespace) -> dict[str, Any]:
    section = {
        "decode": time_decode,
        "vision": time_vision,
        "prefill": time_prefill,
        "adapters": time_adapters,
        "quant": time_quant,
    }[name]
    reset = reset_peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        result = section(args)
    gc.collect()
    result["section_wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = max(peak_rss_mb(), result.get("peak_rss_mb_construction", 0.0))
    result["peak_rss_scope"] = "section (reset at start)" if reset else "process lifetime"
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.rss_child:
        rss_child(args)
        return 0
    resolved = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    print("benchmark args:", json.dumps(resolved), flush=True)
    start = time.perf_counter()
    report: dict[str, Any] = {"args": resolved, "environment": environment_info(args)}
    cpu = report["environment"]["cpu"]
    print(f"CPU: {cpu['model']} ({' '.join(cpu['vector_extensions'])}), {args.threads} threads", file=sys.stderr)
    report["notes"] = {key: NOTES[key] for key in ("general", *args.sections)}
    for name in args.sections:
        print(f"[{time.perf_counter() - start:7.1f}s] section {name} ...", file=sys.stderr, flush=True)
        report[name] = run_section(name, args)
    report["total_wall_s"] = time.perf_counter() - start
    text = json.dumps(report, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
