"""Serving throughput: vLLM (the `andesvl_vllm` plugin) against transformers `generate`, side by side in one run.

The workload: `--requests` (32) chat requests, each with one `--image-size` (448x448) picture and a question, the
scenario adapter chosen per request in turn ocr, gui, base (no adapter); every answer is exactly `--new-tokens` (32)
tokens (vLLM `ignore_eos`, transformers `min_new_tokens`), greedy. Contenders:

- `vllm`: one `LLM.generate` call over all requests (the engine schedules and batches them; one `LoRARequest` per
  request, different adapters in the same step);
- `transformers`: `generate` over the same requests in batches of `--hf-batch-size` (peft's mixed-adapter batch:
  `adapter_names` per row, "__base__" for none), images through the repo's processor, left padding.

Both run in this process, same dtype, same threads (vLLM's CPU worker is bound to all `--threads` cores with no core
held back for its front end, `VLLM_CPU_OMP_THREADS_BIND` / `VLLM_CPU_NUM_OF_RESERVED_CPU`), one warm-up each, then
`--repeats` rounds of vllm, transformers. Throughput = requests x new tokens / wall seconds of the whole round, image
preprocessing and prefill included; the ratio is the median of the per-round ratios. Engine start and model load are
reported apart. Models (`--models`):

- `tiny`: `AndesVL-Tiny/` with its shipped `ocr` and `gui` adapters;
- `0.6b`: a random-init AndesVL-0.6B shape (SigLIP2-Base + Qwen3-0.6B, build_repo's official config) written to a
  temporary folder with two random rank-`--lora-rank` LoRA adapters, so both contenders read the same weights.

    python -m andesvl_tools.serve_benchmark                                   # both models, ~20 min on 2 cores
    python -m andesvl_tools.serve_benchmark --models tiny --repeats 2 --output outputs/serve_benchmark.json

Needs the vLLM line's venv (`bash scripts/setup_env.sh vllm`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import build_repo
from .benchmark import cpu_info

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_CYCLE = ("ocr", "gui", None)  # the per-request mix; None = the base model
QUESTIONS = {
    "ocr": "What text is written in the image?",
    "gui": "Where is the button in this screenshot?",
    None: "Describe the picture.",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("tiny", "0.6b"), default=["tiny", "0.6b"])
    parser.add_argument("--tiny", type=Path, default=ROOT / "AndesVL-Tiny", help="AndesVL-Tiny folder")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hf-batch-size", type=int, default=8, help="transformers generate batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up each)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for each contender")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the 0.6b model's random adapters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "serve_benchmark.json")
    args = parser.parse_args(argv)
    for name in ("requests", "image_size", "new_tokens", "hf_batch_size", "repeats", "threads", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    return args


def workload_images(count: int, size: int, seed: int) -> list:
    """`count` different size x size pictures: a coloured background with a few boxes (seeded)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images = []
    for _ in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.randrange(size - 40), rng.randrange(size - 40)
            box = (x, y, x + rng.randrange(20, 120), y + rng.randrange(20, 120))
            draw.rectangle(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        images.append(image)
    return images


def workload(processor, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The requests: prompt (the repo's chat template), one image, the adapter name (None = base)."""
    images = workload_images(args.requests, args.image_size, args.seed)
    requests = []
    for index, image in enumerate(images):
        adapter = ADAPTER_CYCLE[index % len(ADAPTER_CYCLE)]
        content = [{"type": "image"}, {"type": "text", "text": QUESTIONS[adapter]}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        requests.append({"prompt": prompt, "image": image, "adapter": adapter})
    return requests


def build_random_0_6b(folder: Path, dtype: str, rank: int, seed: int) -> None:
    """A loadable AndesVL-0.6B-shaped repo with random weights and random LoRA adapters `ocr` and `gui`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = build_repo.official_config("0.6B")
    config_class = get_class_from_dynamic_module("configuration_andesvl.AndesVLConfig", str(ROOT))
    model_class = get_class_from_dynamic_module("modeling_andesvl.AndesVLForConditionalGeneration", str(ROOT))
    torch.manual_seed(seed)
    model = model_class(config_class(**config)).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    build_repo.write_repo_files(folder, config)
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=model.default_lora_target_modules
    )
    peft_model = get_peft_model(model, lora, adapter_name="ocr")
    peft_model.add_adapter("gui", lora)
    peft_model.save_pretrained(folder / "adapters")  # non-default adapter names go to adapters/<name>/


def adapter_folders(model: Path) -> dict[str, Path]:
    folders = {name: model / "adapters" / name for name in ADAPTER_CYCLE if name}
    missing = [name for name, folder in folders.items() if not (folder / "adapter_config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{model}: no adapter {missing} under adapters/ (the benchmark mixes ocr, gui, base)")
    return folders


class TransformersContender:
    """transformers + peft: the base with both adapters resident, batches of mixed-adapter rows."""

    def __init__(self, model: Path, args: argparse.Namespace):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch, self.args = torch, args
        start = time.perf_counter()
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
        base = AutoModelForImageTextToText.from_pretrained(
            model, trust_remote_code=True, dtype=getattr(torch, args.dtype)
        ).eval()
        folders = adapter_folders(model)
        names = list(folders)
        self.model = PeftModel.from_pretrained(base, folders[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(folders[name], adapter_name=name)
        self.model.eval()
        self.load_s = time.perf_counter() - start

    def run(self, requests: list[dict[str, Any]]) -> float:
        torch, args = self.torch, self.args
        torch.set_num_threads(args.threads)  # vLLM lowers the process's torch threads when its engine starts
        start = time.perf_counter()
        with torch.inference_mode():
            for first in range(0, len(requests), args.hf_batch_size):
                batch = requests[first : first + args.hf_batch_size]
                inputs = self.processor(
                    text=[request["prompt"] for request in batch],
                    images=[[request["image"]] for request in batch],
                    padding=True,
                    padding_side="left",
                    return_tensors="pt",
                ).to(dtype=getattr(torch, args.dtype))
                output = self.model.generate(
                    **inputs,
                    adapter_names=[request["adapter"] or "__base__" for request in batch],
                    do_sample=False,
                    min_new_tokens=args.new_tokens,
                    max_new_tokens=args.new_tokens,
                )
                generated = output.shape[1] - inputs["input_ids"].shape[1]
                if generated != args.new_tokens:
                    raise RuntimeError(f"transformers generated {generated} tokens, expected {args.new_tokens}")
        return time.perf_counter() - start


class VLLMContender:
    """vLLM with the andesvl_vllm plugin: one engine, both adapters served per request."""

    def __init__(self, model: Path, args: argparse.Namespace):
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        self.args = args
        folders = adapter_folders(model)
        self.lora = {
            name: LoRARequest(name, slot, str(folder)) for slot, (name, folder) in enumerate(folders.items(), 1)
        }
        rank = max(json.loads((folder / "adapter_config.json").read_text())["r"] for folder in folders.values())
        start = time.perf_counter()
        self.llm = LLM(
            model=str(model),
            trust_remote_code=True,
            dtype=args.dtype,
            max_model_len=4096,
            enable_lora=True,
            max_lora_rank=max(8, rank),
            max_loras=len(folders) + 1,  # vLLM-CPU 0.32: keep one LoRA slot free (README, Serving with vLLM)
            max_num_seqs=max(args.requests, 8),
            limit_mm_per_prompt={"image": 1},
            seed=args.seed,
        )
        self.load_s = time.perf_counter() - start
        self.sampling = SamplingParams(
            temperature=0, max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True
        )

    def run(self, requests: list[dict[str, Any]]) -> float:
        prompts = [{"prompt": r["prompt"], "multi_modal_data": {"image": [r["image"]]}} for r in requests]
        loras = [self.lora[r["adapter"]] if r["adapter"] else None for r in requests]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, self.sampling, lora_request=loras, use_tqdm=False)
        seconds = time.perf_counter() - start
        lengths = {len(output.outputs[0].token_ids) for output in outputs}
        if lengths != {self.args.new_tokens}:
            raise RuntimeError(f"vLLM generated {sorted(lengths)} tokens per request, expected {self.args.new_tokens}")
        return seconds

    def close(self) -> None:
        """Stop the engine's processes now (they hold the weights and the KV cache until shut down)."""
        self.llm.llm_engine.engine_core.shutdown()


def image_tokens(hf: TransformersContender, image) -> int:
    """The `<|vision_pad|>` positions one workload image takes in the prompt."""
    ids = hf.processor(text="<image>", images=[image], return_tensors="pt")["input_ids"]
    return int((ids == hf.model.config.image_token_id).sum())


def measure(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Both contenders on `model`: a warm-up each, then `--repeats` rounds of vllm, transformers."""
    import gc

    hf = TransformersContender(model, args)
    requests = workload(hf.processor, args)
    vllm = VLLMContender(model, args)
    contenders = {"vllm": vllm, "transformers": hf}
    for contender in contenders.values():
        contender.run(requests)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(args.repeats):
        for name, contender in contenders.items():
            seconds[name].append(contender.run(requests))
            print(f"  round {round_index + 1}: {name} {seconds[name][-1]:.2f} s", file=sys.stderr, flush=True)
    tokens = args.requests * args.new_tokens
    result = {
        "model": str(model),
        "load_s": {name: round(contender.load_s, 2) for name, contender in contenders.items()},
        "seconds": {name: [round(s, 3) for s in samples] for name, samples in seconds.items()},
        "median_s": {name: statistics.median(samples) for name, samples in seconds.items()},
        "tokens_per_s": {name: tokens / statistics.median(samples) for name, samples in seconds.items()},
        "ratio_vllm_over_transformers_throughput": statistics.median(
            t / v for v, t in zip(seconds["vllm"], seconds["transformers"])
        ),
        "image_tokens_per_request": image_tokens(hf, requests[0]["image"]),
    }
    vllm.close()
    del vllm, hf, contenders
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # vLLM's CPU worker: all cores, none held back for the front end (the transformers side gets the same cores)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault(
        "VLLM_CPU_KVCACHE_SPACE", "4"
    )  # GiB: 32 prompts of ~250 tokens on the 0.6B shape in fp32 need ~2
    import torch
    import transformers
    import vllm

    report: dict[str, Any] = {
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "cpu": cpu_info(),
        "versions": {"vllm": vllm.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "vllm_cpu_env": {key: os.environ[key] for key in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")},
        "adapter_mix": [name or "base" for name in ADAPTER_CYCLE],
        "results": {},
    }
    print(
        f"CPU: {report['cpu']['model']} ({' '.join(report['cpu']['vector_extensions'])}), {args.threads} threads",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="andesvl-serve-bench-") as tmp:
        for name in args.models:
            model = args.tiny
            if name == "0.6b":
                model = Path(tmp) / "AndesVL-0.6B-random"
                build_random_0_6b(model, args.dtype, args.lora_rank, args.seed)
            print(f"{name}: {model}", file=sys.stderr, flush=True)
            report["results"][name] = measure(model, args)
    text = json.dumps(report, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    for name, result in report["results"].items():
        speed, ratio = result["tokens_per_s"], result["ratio_vllm_over_transformers_throughput"]
        print(
            f"{name}: vLLM {speed['vllm']:.1f} tok/s, transformers (batch {args.hf_batch_size}) "
            f"{speed['transformers']:.1f} tok/s, ratio {ratio:.2f}x "
            f"(median of {args.repeats} paired rounds; {report['cpu']['model']}, "
            f"{' '.join(report['cpu']['vector_extensions'])})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":  # the engine spawns processes: run only as a script / module
    sys.exit(main())
