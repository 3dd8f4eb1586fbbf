"""Ask an AndesVL model a question about one or more images, through the Auto classes (as Hub users do).

python -m andesvl_tools.chat --model OPPOer/AndesVL-4B-Instruct --image cat.png "What is in the picture?"
python -m andesvl_tools.chat --model ./AndesVL-0.6B --image a.png --image b.png --thinking --stream "Compare them."
python -m andesvl_tools.chat --model ./AndesVL-1B --adapter ocr --image receipt.png "Read the total."
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", help="the user question")
    parser.add_argument("--model", required=True, help="Hub id or local folder of an AndesVL repo")
    parser.add_argument("--image", action="append", default=[], help="image path, data URL or URL (repeatable)")
    parser.add_argument("--system", help="optional system prompt")
    parser.add_argument("--thinking", action="store_true", help="thinking mode: the answer starts with <think>")
    parser.add_argument("--adapter", help="scenario adapter under adapters/<name>/ to activate (needs peft)")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation budget")
    parser.add_argument("--sample", action="store_true", help="sample with generation_config.json (default: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (matters with --sample)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    parser.add_argument("--attn-implementation", default="sdpa", help="eager, sdpa or flash_attention_2")
    parser.add_argument("--allow-remote-images", action="store_true", help="allow http(s) image URLs")
    parser.add_argument("--output", type=Path, help="also write the question, answer and timings as JSON here")
    return parser.parse_args(argv)


def build_messages(args: argparse.Namespace) -> list[dict]:
    content = [{"type": "image", "url": str(image)} for image in args.image]
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": content + [{"type": "text", "text": args.question}]}]


def load(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(
        args.model, trust_remote_code=True, allow_remote_images=args.allow_remote_images
    )
    model = AutoModelForImageTextToText.from_pretrained(
        args.model,
        trust_remote_code=True,
        dtype=getattr(torch, args.dtype),
        attn_implementation=args.attn_implementation,
    ).eval()
    if args.adapter:  # a scenario adapter shipped under adapters/<name>/ of the model repo
        model.load_scenario_adapter(args.adapter)
    return model, processor


def answer(model, processor, messages: list[dict], args: argparse.Namespace) -> str:
    import torch
    from transformers import TextIteratorStreamer

    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        enable_thinking=args.thinking,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    ).to(model.device, dtype=model.dtype)  # casts only the floating-point pixel_values
    generate_kwargs = dict(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    prefix = "<think>" if args.thinking else ""
    if not args.stream:
        with torch.inference_mode():
            new_tokens = model.generate(**generate_kwargs)[0, inputs["input_ids"].shape[1] :]
        return prefix + processor.decode(new_tokens, skip_special_tokens=True)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=model.generate, kwargs=generate_kwargs | {"streamer": streamer})
    worker.start()
    pieces = [prefix]
    print(prefix, end="", flush=True)
    for piece in streamer:
        pieces.append(piece)
        print(piece, end="", flush=True)
    worker.join()
    print()
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, processor = load(args)
    loaded = time.perf_counter()
    text = answer(model, processor, build_messages(args), args)
    done = time.perf_counter()
    if not args.stream:
        print(text)
    report = {
        "model": args.model,
        "images": args.image,
        "question": args.question,
        "adapter": args.adapter,
        "thinking": args.thinking,
        "answer": text,
        "load_seconds": round(loaded - start, 3),
        "answer_seconds": round(done - loaded, 3),
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
