"""Exported ExecuTorch programs against eager PyTorch on the same CPU and threads, side by side in one run.

    python -m andesvl_tools.executorch_benchmark --model AndesVL-Tiny --programs out/et --programs out/et-8da4w \
        --sections speed,accuracy --output docs/benchmarks/executorch_tiny.json

speed: prefill and decode tokens/s of the text decoder (eager: `model.language_model` with its dynamic KV cache;
exported: the `text_decoder` method), interleaved rounds, medians, ratios exported / eager; vision time per bucket
(eager `get_image_features` vs the bucket method); peak RSS and RSS growth of a fresh process that loads one
variant and runs one prompt; file sizes from the manifests.
accuracy: AndesVL-Tiny's evaluation (the same generated examples and scorers as `andesvl_tools.evaluate`): the base
on vqa and multi, the ocr and gui adapters on their tasks, for the eager float model, `--int4-model` (an eager int4
base from `andesvl_tools.quantize`) and every exported folder.
merged_lora: for every adapter of every exported folder, its program as exported (LoRA unmerged, base weights read
from `base.ptd`) against the same adapter merged into a copy of `--model` (peft's merge) and exported as a standalone
`text_decoder` program with every weight inside (no `base.ptd`): file sizes, prefill and decode tokens/s in
interleaved rounds (as speed, the base program's decoder timed alongside for reference), ratios merged / unmerged, and
the largest logit difference between the two.

    python -m andesvl_tools.executorch_benchmark --model AndesVL-Tiny --programs out/et --sections merged_lora \
        --output outputs/executorch_merged_lora.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .benchmark import cpu_info, peak_rss_mb

TASK_ADAPTERS = {"vqa": None, "multi": None, "ocr": "ocr", "gui": "gui"}
SECTIONS = ("speed", "accuracy", "merged_lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the float AndesVL folder that was exported")
    parser.add_argument("--programs", type=Path, action="append", required=True, help="an export folder (repeat)")
    parser.add_argument("--sections", default="speed", help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch and XNNPACK threads")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--int4-model", type=Path, help="accuracy: an eager int4 base (andesvl_tools.quantize)")
    parser.add_argument("--data", type=Path, help="accuracy: make_datasets output (generated when absent)")
    parser.add_argument("--limit", default="vqa=300,multi=200,ocr=200,gui=100", help="accuracy: examples per task")
    parser.add_argument("--output", type=Path, help="write the report as JSON")
    parser.add_argument("--rss-child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def set_threads(count: int) -> None:
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    torch.set_num_threads(count)
    _unsafe_reset_threadpool(count)


def load_eager(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()


def load_base(folder: Path):
    from .executorch_runner import load_manifest, load_program

    manifest = load_manifest(folder)
    return manifest, load_program(folder, manifest)


def prompt_embeddings(model, length: int) -> torch.Tensor:
    ids = torch.randint(0, 150000, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.get_input_embeddings()(ids)  # [1, S, D]


@torch.no_grad()
def eager_round(model, embeds: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `new_tokens` steps) of the eager language model."""
    language_model = model.language_model
    started = time.perf_counter()
    output = language_model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    prefilled = time.perf_counter()
    cache, step = output.past_key_values, embeds[:, -1:]
    for _ in range(new_tokens):
        output = language_model(inputs_embeds=step, past_key_values=cache, use_cache=True)
        cache = output.past_key_values
    return prefilled - started, time.perf_counter() - prefilled


def exported_round(decoder, embeds: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    length = embeds.shape[1]
    started = time.perf_counter()
    decoder.execute([embeds, torch.arange(length)])
    prefilled = time.perf_counter()
    step = embeds[:, -1:].contiguous()
    for index in range(new_tokens):
        decoder.execute([step, torch.tensor([length + index])])
    return prefilled - started, time.perf_counter() - prefilled


def variant_name(manifest: dict[str, Any]) -> str:
    """executorch_fp32, executorch_8da4w or executorch_dequantized (a quantized folder's export), from the manifest."""
    return f"executorch_{(manifest['quantization'] or {}).get('linear', 'fp32').split(' ')[0]}"


def check_lengths(args: argparse.Namespace, folder: Path, manifest: dict[str, Any]) -> None:
    if args.prompt_tokens + args.new_tokens >= manifest["max_context"]:
        raise ValueError(f"{folder}: --prompt-tokens + --new-tokens must stay below {manifest['max_context']}.")


def interleaved_speeds(rounds: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """{name: prefill and decode tokens/s}: every `rounds[name]()` (-> prefill seconds, decode seconds) once per
    round, in turn, `args.rounds` + 1 rounds; the first warms up and is dropped, the rest give medians."""
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in rounds}
    for _ in range(args.rounds + 1):
        for name, run_round in rounds.items():
            prefill, decode = run_round()
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decode)
    rows = {}
    for name, measured in times.items():
        prefill, decode = statistics.median(measured["prefill"][1:]), statistics.median(measured["decode"][1:])
        rows[name] = {
            "prefill_tokens_per_s": round(args.prompt_tokens / prefill, 1),
            "decode_tokens_per_s": round(args.new_tokens / decode, 1),
        }
    return rows


def vision_inputs(model, bucket: str) -> tuple[torch.Tensor, torch.Tensor]:
    width, height = (int(v) for v in bucket.split("x"))
    patch = model.config.vision_config.patch_size
    grid = (height // patch, width // patch)
    pixels = torch.randn(grid[0] * grid[1], model.config.vision_config.num_channels * patch**2)
    return pixels, torch.tensor([grid])


def speed_section(args: argparse.Namespace) -> dict[str, Any]:
    from .executorch_runner import load_program

    model = load_eager(args.model)
    embeds = prompt_embeddings(model, args.prompt_tokens)
    variants = {"eager_fp32": None}
    manifests, folders = {}, {}
    for folder in args.programs:
        manifest, program = load_base(folder)
        name = variant_name(manifest)
        variants[name], manifests[name], folders[name] = program, manifest, folder
        check_lengths(args, folder, manifest)
    decoders = {name: program.load_method("text_decoder") for name, program in variants.items() if program}
    for name, manifest in list(manifests.items()):  # each adapter's program (LoRA unmerged) over the same base.ptd
        folder = folders[name]
        for adapter, path in manifest["adapters"].items():
            program = load_program(folder, manifest, path)
            variants[f"{name}+{adapter}"] = program
            decoders[f"{name}+{adapter}"] = program.load_method("text_decoder")
    rounds = {
        name: (lambda: eager_round(model, embeds, args.new_tokens))
        if name == "eager_fp32"
        else (lambda decoder=decoders[name]: exported_round(decoder, embeds, args.new_tokens))
        for name in variants
    }
    rows = interleaved_speeds(rounds, args)
    eager = rows["eager_fp32"]
    for row in rows.values():
        row["prefill_vs_eager"] = round(row["prefill_tokens_per_s"] / eager["prefill_tokens_per_s"], 2)
        row["decode_vs_eager"] = round(row["decode_tokens_per_s"] / eager["decode_tokens_per_s"], 2)
    vision = {}
    for name, manifest in manifests.items():
        for bucket, method_name in manifest["buckets"].items():
            pixels, grid = vision_inputs(model, bucket)
            method = variants[name].load_method(method_name)
            eager_times, exported_times = [], []
            for _ in range(args.rounds + 1):
                started = time.perf_counter()
                with torch.no_grad():
                    model.get_image_features(pixels, grid)
                eager_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                method.execute([pixels])
                exported_times.append(time.perf_counter() - started)
            eager_ms, exported_ms = (statistics.median(t[1:]) * 1e3 for t in (eager_times, exported_times))
            vision.setdefault(bucket, {"eager_fp32_ms": round(eager_ms, 2)})[f"{name}_ms"] = round(exported_ms, 2)
            vision[bucket][f"{name}_vs_eager"] = round(eager_ms / exported_ms, 2)
    sizes = {name: manifest["sizes_bytes"] for name, manifest in manifests.items()}
    rss = {"eager_fp32": peak_rss("eager", args.model, args)}
    for name, folder in folders.items():
        rss[name] = peak_rss("executorch", folder, args)
    return {"decoder": rows, "vision_ms_per_image": vision, "sizes_bytes": sizes, "memory_mib": rss}


def merged_lora_section(args: argparse.Namespace) -> dict[str, Any]:
    """{variant+adapter: sizes, speeds and ratios of the merged standalone program vs the unmerged adapter program}."""
    model = load_eager(args.model)
    embeds = prompt_embeddings(model, args.prompt_tokens)
    del model
    rows, skipped = {}, {}
    for folder in args.programs:
        manifest, program = load_base(folder)
        refusal = merge_refusal(manifest)
        if refusal:  # the speed section may time it; this one cannot compare it
            skipped[str(folder)] = refusal
            continue
        check_lengths(args, folder, manifest)
        base_decoder = program.load_method("text_decoder")
        with tempfile.TemporaryDirectory(prefix="merged-lora-") as scratch:
            for adapter, relative in manifest["adapters"].items():
                merged_path = Path(scratch) / f"{adapter}-merged.pte"
                rows[f"{variant_name(manifest)}+{adapter}"] = compare_merged(
                    args, (folder, manifest, base_decoder), adapter, relative, merged_path, embeds
                )
    if not rows:
        raise ValueError(
            f"merged_lora: no adapter program of an fp32 export of --model in {[str(p) for p in args.programs]}"
            + (f"; skipped: {skipped}" if skipped else ".")
        )
    return rows | ({"skipped_exports": skipped} if skipped else {})


def merge_refusal(manifest: dict[str, Any]) -> str | None:
    """Why an export cannot be compared merged against unmerged, or None. Only exports of the float `--model` compare:
    the adapters are merged into its float weights, so an 8da4w export (requantized) or a quantized folder's export
    (another base) would measure another model."""
    linear = (manifest["quantization"] or {}).get("linear")
    return f"a {linear} export: merged and unmerged compare on an fp32 export of --model" if linear else None


def compare_merged(args, export, adapter: str, relative: str, merged_path: Path, embeds):
    """One adapter of `export` (folder, manifest, base decoder): export it merged into `merged_path`, then time both
    programs (and the base decoder, for reference) in interleaved rounds."""
    from executorch.runtime import Runtime

    from .executorch_runner import load_program
    from .export_executorch import write_merged_decoder

    folder, manifest, base_decoder = export
    started = time.perf_counter()
    merged_bytes = write_merged_decoder(args.model, adapter, manifest["max_context"], merged_path)
    export_seconds = time.perf_counter() - started
    decoders = {
        "unmerged": load_program(folder, manifest, relative).load_method("text_decoder"),
        "merged": Runtime.get().load_program(merged_path).load_method("text_decoder"),
    }
    prompt = torch.arange(embeds.shape[1])
    logits = {name: decoder.execute([embeds, prompt])[0] for name, decoder in decoders.items()}
    timed = decoders | {"base": base_decoder}
    speeds = interleaved_speeds(
        {name: (lambda d=decoder: exported_round(d, embeds, args.new_tokens)) for name, decoder in timed.items()},
        args,
    )
    unmerged, merged = speeds["unmerged"], speeds["merged"]
    sizes = manifest["sizes_bytes"]
    return {
        "base_without_adapter": speeds["base"],
        "unmerged": {
            **unmerged,
            "program_bytes": sizes[relative],
            "shared_base_ptd_bytes": sizes[manifest["data"]],
            "layout": "adapter program (LoRA factors + graph) reading the base weights from base.ptd",
        },
        "merged": {
            **merged,
            "program_bytes": merged_bytes,
            "layout": "standalone text_decoder program, adapter merged into every weight, no base.ptd",
            "export_seconds": round(export_seconds, 1),
        },
        "merged_vs_unmerged": {
            "program_bytes": round(merged_bytes / sizes[relative], 1),
            "prefill_tokens_per_s": round(merged["prefill_tokens_per_s"] / unmerged["prefill_tokens_per_s"], 2),
            "decode_tokens_per_s": round(merged["decode_tokens_per_s"] / unmerged["decode_tokens_per_s"], 2),
        },
        "max_abs_logit_difference": float((logits["merged"] - logits["unmerged"]).abs().max()),
        "same_next_token": int(logits["merged"].argmax()) == int(logits["unmerged"].argmax()),
    }


def peak_rss(kind: str, path: Path, args: argparse.Namespace) -> dict[str, float]:
    """Memory (MiB) of a fresh process that loads one variant and runs one prefill plus the decode steps: its peak
    RSS, and how much its RSS grew from after the imports (torch, transformers, ExecuTorch: the same for every
    variant) to after the run."""
    command = [sys.executable, "-m", "andesvl_tools.executorch_benchmark", "--model", str(args.model)]
    command += ["--programs", str(path), "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens)]
    command += ["--new-tokens", str(args.new_tokens), "--rss-child", kind, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def resident_mib() -> float:
    """This process's current resident set (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def rss_child(args: argparse.Namespace) -> None:
    kind, path = args.rss_child
    set_threads(args.threads)
    import transformers  # noqa: F401  (every import a variant needs, before the baseline)
    from executorch.runtime import Runtime  # noqa: F401

    baseline = resident_mib()
    if kind == "eager":
        model = load_eager(Path(path))
        eager_round(model, prompt_embeddings(model, args.prompt_tokens), args.new_tokens)
    else:
        manifest, program = load_base(Path(path))
        embeds = program.load_method("token_embedding").execute([torch.randint(0, 150000, (1, args.prompt_tokens))])[0]
        exported_round(program.load_method("text_decoder"), embeds, args.new_tokens)
    peak = peak_rss_mb()  # VmHWM: ru_maxrss would carry the spawning process's peak over exec
    print(json.dumps({"peak_rss_mib": round(peak, 1), "rss_growth_mib": round(resident_mib() - baseline, 1)}))


def parse_limits(text: str) -> dict[str, int]:
    limits = {}
    for part in text.split(","):
        task, _, count = part.partition("=")
        if task not in TASK_ADAPTERS or not count.isdigit():
            raise ValueError(f"--limit part {part!r}: expected task=count with a task of {list(TASK_ADAPTERS)}.")
        limits[task] = int(count)
    return limits


def accuracy_section(args: argparse.Namespace) -> dict[str, Any]:
    from . import evaluate, make_datasets
    from .demo import switch_adapter
    from .executorch_runner import ExecutorchAndesVL

    limits = parse_limits(args.limit)
    data = args.data or Path("outputs") / "executorch_eval_data"
    if not (data / next(iter(limits)) / "test.jsonl").is_file():
        sizes = [f"--{task}-test-size={count}" for task, count in limits.items()]
        make_datasets.main(
            ["--output", str(data), "--seed", "0", "--tasks", ",".join(limits)]
            + sizes
            + ["--train-size", "1", "--val-size", "1"]
        )
    examples = {task: evaluate.load_task(data, task, "test", count) for task, count in limits.items()}
    rows: dict[str, dict[str, Any]] = {}
    eager_rows = {"eager_fp32": args.model} | ({"eager_int4": args.int4_model} if args.int4_model else {})
    for name, folder in eager_rows.items():
        from transformers import AutoProcessor

        model, processor = load_eager(folder), AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
        loaded: set[str] = set()
        rows[name] = {}
        for task, items in examples.items():
            switch_adapter(model, TASK_ADAPTERS[task], loaded)
            predictions = evaluate.predict(model, processor, items, 8, 32)
            rows[name][task] = score(task, predictions, items)
        del model
    for folder in args.programs:
        runner = ExecutorchAndesVL(folder)
        name = f"executorch_{(runner.manifest['quantization'] or {}).get('linear', 'fp32').split(' ')[0]}"
        rows[name] = {}
        for task, items in examples.items():
            predictions = [runner.chat(i["messages"], i["images"], TASK_ADAPTERS[task], 32) for i in items]
            rows[name][task] = score(task, predictions, items)
    return {"examples": {task: len(items) for task, items in examples.items()}, "rows": rows, "adapters": TASK_ADAPTERS}


def score(task: str, predictions: list[str], items: list[dict[str, Any]]) -> dict[str, Any]:
    from .evaluate import SCORERS

    scores = SCORERS[task](predictions, [item["target"] for item in items])
    return {"accuracy": scores["accuracy"], "predictions": predictions[:5]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return {}
    set_threads(args.threads)
    report: dict[str, Any] = {
        "cpu": cpu_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],  # other processes on the same CPUs
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "model": str(args.model),
        "programs": [str(p) for p in args.programs],
    }
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"Unknown --sections {unknown}; valid: {', '.join(SECTIONS)}.")
    if "speed" in sections:
        report["speed"] = speed_section(args)
    if "accuracy" in sections:
        report["accuracy"] = accuracy_section(args)
    if "merged_lora" in sections:
        report["merged_lora"] = merged_lora_section(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
