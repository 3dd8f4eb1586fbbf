"""Run a list of requests through one `vllm.LLM` engine in its own process and write what it generated.

    python tests/vllm_worker.py spec.json answers.json

Used by tests/test_vllm.py, so that every engine (and the environment it reads, such as a Hub cache given by
HF_HUB_CACHE with HF_HUB_OFFLINE=1) lives and dies in a process of its own. `spec.json`:
{"llm": {keyword arguments of vllm.LLM}, "max_tokens": int,
 "requests": [{"prompt": str, "images": [path, ...], "mm_processor_kwargs": {...}, "lora": [name, id, path] | null}]}
`answers.json`: one {"prompt_token_ids": [...], "token_ids": [...], "logprobs": [[[token, logprob], ...] per step]}
per request, in order, from one `generate` call (with "logprobs": k in the spec, the top k tokens of each step).
"""

from __future__ import annotations

import json
import sys


def vllm_prompt(request: dict) -> dict:
    from PIL import Image

    prompt = {"prompt": request["prompt"]}
    if request.get("images"):
        prompt["multi_modal_data"] = {"image": [Image.open(path).convert("RGB") for path in request["images"]]}
    if request.get("mm_processor_kwargs"):
        prompt["mm_processor_kwargs"] = request["mm_processor_kwargs"]
    return prompt


def main(spec_path: str, answers_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    with open(spec_path) as file:
        spec = json.load(file)
    llm = LLM(**spec["llm"])
    requests = spec["requests"]
    outputs = llm.generate(
        [vllm_prompt(request) for request in requests],
        SamplingParams(temperature=0, max_tokens=spec["max_tokens"], logprobs=spec.get("logprobs")),
        lora_request=[LoRARequest(*request["lora"]) if request.get("lora") else None for request in requests],
    )
    answers = [
        {
            "prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(output.outputs[0].token_ids),
            "logprobs": [
                sorted(([token, top.logprob] for token, top in step.items()), key=lambda pair: -pair[1])
                for step in output.outputs[0].logprobs or []
            ],
        }
        for output in outputs
    ]
    with open(answers_path, "w") as file:
        json.dump(answers, file)


if __name__ == "__main__":  # the engine spawns processes: run only as a script
    main(*sys.argv[1:])
