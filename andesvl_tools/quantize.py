"""Quantize the language model of an AndesVL folder (weight-only int8/4/3/2) into a complete, loadable repo folder.

    python -m andesvl_tools.quantize --model out/AndesVL-1B-Instruct --output out/AndesVL-1B-Instruct-int4 --bits 4
    python -m andesvl_tools.quantize --model /tmp/AndesVL-tiny --output /tmp/AndesVL-tiny-int8 --bits 8 --group-size 32

The float model is loaded with the Auto classes (`trust_remote_code=True`, checkpoint dtype) and quantized with the
source folder's own `quantization_andesvl.py`, so the code that produced the codes is the code shipped to dequantize
them (and the code QALFT's `fake_quantize` comes from). The output gets every non-weight file of the source (remote
code, tokenizer, processor JSON, chat template, README, adapters/, ...), the quantized `model.safetensors`, and the
source `config.json` plus a `quantization` field. It is then loaded back through `AutoModelForImageTextToText`, run on
a fixed image+text input (max |logit difference| vs the float model) and asked for a few greedy tokens; everything
goes to stdout and `quantization_report.json` in the output folder.

Backends: `torch` (the shipped one: plain PyTorch, bit-identical to QALFT's `fake_quantize`). `torchao` is refused
(checked with torchao 0.18.0 on torch 2.13 CPU): its symmetric int4 scale is amax/7.5 (ours amax/7), so its codes
can never match QALFT bit for bit; its int4 CPU kernel (`Int4WeightOnlyConfig`) needs the extra `mslk` package; and
its checkpoints are torchao tensor subclasses that need torchao to load. `auto` therefore always resolves to `torch`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .folders import overlap_error, staged_folder

REPORT_NAME = "quantization_report.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIPPED_NAMES = ("config.json", REPORT_NAME, "__pycache__", ".git", ".cache")
LOADING_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys")
TORCHAO_REFUSAL = (
    "--backend torchao is not supported (checked with torchao 0.18.0): its symmetric int4 scale is amax/7.5 "
    "(AndesVL's is amax/7), so its codes cannot match QALFT's fake_quantize bit for bit; its int4 CPU kernel needs "
    "the extra `mslk` package; and its checkpoints need torchao to load. Use --backend torch (the shipped backend)."
)


def resolve_backend(name: str) -> tuple[str, str]:
    """(backend, why) for `--backend`; only the torch backend is shipped (see the module docstring)."""
    if name == "torchao":
        raise ValueError(TORCHAO_REFUSAL)
    if name == "auto":
        return "torch", "auto -> torch: the torchao path is not implemented (not bit-identical to QALFT)"
    return "torch", "requested"


def quantization_module(model) -> Any:
    """The `quantization_andesvl` module of the remote code the model was loaded with."""
    package = type(model).__module__.rpartition(".")[0]
    modeling = sys.modules[type(model).__module__]
    if not hasattr(modeling, "replace_linear_with_quantized"):
        raise ValueError(
            f"The remote code of this folder ({modeling.__file__}) cannot load quantized weights (no "
            "`replace_linear_with_quantized` in modeling_andesvl.py); rebuild the folder with "
            "python -m andesvl_tools.build_repo."
        )
    return importlib.import_module(f"{package}.quantization_andesvl")


def check_inputs(config, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed prompt with one 4x4-patch image (4 visual tokens) and seeded random pixels, as the processor packs it."""
    vision = config.vision_config
    side = 2 * vision.merge_size
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(side * side, vision.num_channels * vision.patch_size**2, generator=generator)
    image = [config.image_start_token_id] + [config.image_token_id] * (side * side // vision.merge_size**2)
    ids = torch.tensor([[9707, 11, 1879, *image, config.image_end_token_id, 198, 3838]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixel_values.to(dtype),
        "image_grid_hw": torch.tensor([[side, side]]),
    }


@torch.no_grad()
def run_check(model, inputs: dict[str, torch.Tensor], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """(logits [1, S, V] in fp32, greedy token ids) on the fixed input."""
    logits = model(**inputs).logits.float()
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return logits, output[0, inputs["input_ids"].shape[1] :].tolist()


def is_weight_file(path: Path) -> bool:
    index = path.name.endswith((".bin.index.json", ".safetensors.index.json"))
    return path.is_file() and (path.suffix in WEIGHT_SUFFIXES or index)


def copy_non_weight_files(source: Path, output: Path) -> list[str]:
    """Copy everything but the top-level weight shards and config.json (written separately); subfolders whole."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.name in SKIPPED_NAMES or is_weight_file(path):
            continue
        if path.is_dir():
            shutil.copytree(path, output / path.name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, output / path.name)
        copied.append(path.name)
    return copied


def weights_on_disk(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if is_weight_file(path))


def write_config(source: Path, output: Path, spec: dict[str, Any], compute_dtype: str | None = None) -> None:
    """The source config.json (official field set, auto_map) plus the `quantization` spec, in the compute dtype the
    scales ask for (bf16 scales: a bf16 model, whose decode steps run on torch's kernels); a quantized LM head unties
    the output layer from the input embedding."""
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = spec
    for key in ("torch_dtype", "dtype") if compute_dtype else ():
        config[key] = compute_dtype
    if spec.get("lm_head"):
        for level in (config, config.get("text_config", {})):
            level["tie_word_embeddings"] = False
    (output / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def compute_dtype(spec: dict[str, Any], config) -> str:
    """bf16 for bf16 scales (the kernels' dtype, and what the model loads in with `dtype="auto"`), else the
    source's dtype."""
    if spec["scale_dtype"] == "bfloat16":
        return "bfloat16"
    source = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(source).removeprefix("torch.")


def check_folders(source: Path, output: Path) -> None:
    if not (source / "config.json").is_file():
        raise ValueError(f"--model {source} is not a model folder (no config.json).")
    source, output = source.resolve(), output.resolve()
    if overlap_error(output, source):
        raise ValueError(f"--output {output} must not be, contain or lie inside the source folder ({source}).")
    if output.is_dir() and any(output.iterdir()) and not (output / REPORT_NAME).is_file():
        raise ValueError(
            f"--output {output} is a non-empty folder that no earlier quantize.py run wrote (no "
            f"{REPORT_NAME}); choose a new or empty folder."
        )


def choose_group_size(model, modules_regex: str, requested: int | None, default: int) -> int:
    """The requested group size if it divides the input width of every quantized linear, else a clear error naming
    the sizes that do; without a request, the largest of default, default/2, ... that divides them all (printed)."""
    widths = sorted(
        {
            module.in_features
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and re.fullmatch(modules_regex, name)
        }
    )
    if not widths:
        raise ValueError(f"No linear layer matches --modules {modules_regex!r}: nothing to quantize.")
    candidates = [size for size in (default >> shift for shift in range(default.bit_length())) if size]
    valid = [size for size in candidates if all(width % size == 0 for width in widths)]
    if requested is not None:
        if any(width % requested for width in widths):
            raise ValueError(
                f"--group-size {requested} does not divide every input width of the quantized layers "
                f"({widths}); sizes that do: {valid}."
            )
        return requested
    print(f"group size {valid[0]} (the largest of {candidates} that divides every input width, {widths})")
    return valid[0]


def quantize_folder(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText

    backend, backend_note = resolve_backend(args.backend)
    check_folders(args.model, args.output)
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype="auto").eval()
    if getattr(model.config, "quantization", None):
        raise ValueError(f"{args.model} is already quantized ({model.config.quantization}); start from a float model.")
    inputs = check_inputs(model.config, model.dtype)
    float_logits, float_tokens = run_check(model, inputs, args.check_tokens)

    quantization = quantization_module(model)
    modules_regex = args.modules or quantization.DEFAULT_MODULES
    group_size = choose_group_size(model, modules_regex, args.group_size, quantization.DEFAULT_GROUP_SIZE)
    _, elements_before = quantization.state_bytes(model)
    lm_head = {"lm_head": True} if args.lm_head else {}  # folders whose remote code predates the option refuse it
    report = quantization.quantize_model(
        model,
        bits=args.bits,
        group_size=group_size,
        modules_regex=modules_regex,
        scale_dtype=args.scale_dtype,
        **lm_head,
    )
    spec = {key: report[key] for key in quantization.SPEC_KEYS}
    dtype = compute_dtype(spec, model.config)
    model.to(getattr(torch, dtype))  # the float parts; the scales keep their dtype
    saved_bytes = quantization.state_bytes(model)[0]  # in the compute dtype, untied with --lm-head
    with staged_folder(args.output) as staged:  # an earlier output is replaced whole (no stale shards), at the end
        model.save_pretrained(staged)
        copied = copy_non_weight_files(args.model, staged)
        write_config(args.model, staged, spec, dtype)
    del model

    reloaded, info = AutoModelForImageTextToText.from_pretrained(
        args.output, trust_remote_code=True, dtype="auto", output_loading_info=True
    )
    inputs = {key: value.to(reloaded.dtype) if value.is_floating_point() else value for key, value in inputs.items()}
    quantized_logits, quantized_tokens = run_check(reloaded.eval(), inputs, args.check_tokens)
    difference = (quantized_logits - float_logits).abs().max().item()
    float_std = float_logits.std().item()
    report = {
        "source": str(args.model),
        "output": str(args.output),
        "backend": backend,
        "backend_note": backend_note,
        **{key: value for key, value in report.items() if key != "module_names"},
        "compute_dtype": dtype,
        "saved_model_bytes": saved_bytes,
        "bits_per_weight_saved_model": 8 * saved_bytes / elements_before,  # every tensor, scales included
        "weights_on_disk_before": weights_on_disk(args.model),
        "weights_on_disk_after": weights_on_disk(args.output),
        "copied": copied,
        "check": {
            "loading_info": {key: sorted(map(str, info.get(key, []))) for key in LOADING_PROBLEMS},
            "max_abs_logit_diff": difference,
            "float_logit_std": float_std,
            "relative_logit_diff": difference / float_std,
            "greedy_tokens_float": float_tokens,
            "greedy_tokens_quantized": quantized_tokens,
        },
        "module_names": report["module_names"],
    }
    (args.output / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    problems = {key: keys for key, keys in report["check"]["loading_info"].items() if keys}
    if problems:
        raise RuntimeError(f"The quantized folder does not load cleanly: {problems}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="float AndesVL folder (config.json + weights)")
    parser.add_argument("--output", type=Path, required=True, help="folder to write (created if needed)")
    parser.add_argument(
        "--bits",
        type=int,
        choices=(2, 3, 4, 8),
        default=4,
        help="code width (default 4); 3 and 2 store fewer bits per weight on disk (3.125 / 2.125 at group 128) and "
        "decode on the int4 kernel like 4",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        help="inputs per scale (default: 64, which divides every "
        "in_features of every official AndesVL size, or the largest power-of-two fraction of it "
        "that divides this model's, e.g. 16 for AndesVL-Tiny; the choice is printed); -1: one scale per output "
        "row (with --bits 8 --scale-dtype bfloat16, decoding in bf16 runs on torch's int8 kernel)",
    )
    parser.add_argument(
        "--modules",
        help="regex fullmatched against module names (default: the language model's "
        "attention and MLP projections, never lm_head, the vision encoder or the projector)",
    )
    parser.add_argument(
        "--scale-dtype",
        choices=("float16", "bfloat16", "float32"),
        default="bfloat16",
        help="scale dtype (default bfloat16: the CPU kernels' dtype; the folder is then saved as a bf16 model). The "
        "shipped *-qalft-int4 adapters of AndesVL-Tiny trained against float16 scales, group 16",
    )
    parser.add_argument(
        "--lm-head",
        action="store_true",
        help="quantize the LM head too (same bits and groups; the embedding keeps its float rows, so the folder is "
        "untied: tie_word_embeddings false)",
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "torchao", "auto"),
        default="auto",
        help="torch is the shipped backend; torchao is refused (see above); auto -> torch",
    )
    parser.add_argument("--check-tokens", type=int, default=4, help="greedy tokens generated by the load-back check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = quantize_folder(args)
    print(json.dumps({key: value for key, value in report.items() if key != "module_names"}, indent=2))
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad arguments or folders: one clear line, no traceback
        sys.exit(f"error: {error}")
