"""Tests for the user-facing generation APIs: the official `model.chat()` / `model.completion()`, the
`image-text-to-text` pipeline, streaming, and loading offline without flash-attn.

Run in both supported transformers lines (CPU only, offline):
    .venv/tf4/bin/python -m pytest tests/test_chat_api.py -q
    .venv/tf5/bin/python -m pytest tests/test_chat_api.py -q

The tiny random repos of `conftest.py` answer almost every prompt by repeating its last token, which would make
"same answer" checks pass for any prompt. These tests use a copy of the AIMv2 tiny repo whose LLM residual branches
are scaled up (`lively_repo`), so greedy answers depend on the prompt and the pixels. Answer text is never asserted,
only equality between code paths; prompts are compared exactly by recording what reaches `generate`.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, TextIteratorStreamer, pipeline

from conftest import IMAGE_TOKEN_ID, load_model, load_processor, random_image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
GREEDY = {"max_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Many tiny decode steps: with several intra-op threads on a busy CPU, OpenMP spin-waits make them ~20x slower.
    Restored afterwards; both sides of every comparison run under the same setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def lively_repo(tiny_repos, tmp_path_factory):
    """The AIMv2 tiny repo with LLM attention/MLP output projections scaled by 30 (answers depend on the input)."""
    folder = tmp_path_factory.mktemp("lively") / "AndesVL-1B-lively"
    shutil.copytree(tiny_repos["aimv2"], folder)
    state = load_file(folder / "model.safetensors")
    for key in state:
        if key.startswith("language_model.") and key.endswith(("mlp.down_proj.weight", "self_attn.o_proj.weight")):
            state[key] = state[key] * 30
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def model(lively_repo):
    return load_model(lively_repo)


@pytest.fixture(scope="module")
def processor(lively_repo):
    return load_processor(lively_repo)


@contextlib.contextmanager
def recording_generate(model):
    """Record the keyword arguments of every `model.generate` call (the real `generate` still runs)."""
    calls, original = [], model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    model.generate = spy
    try:
        yield calls
    finally:
        del model.generate


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE_A, IMAGE_B = random_image(120, 90, seed=3), random_image(64, 64, seed=4)
OFFICIAL_MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(IMAGE_A), "detail": "low"}},
            {"type": "image", "image": IMAGE_B},
            {"type": "text", "text": "Compare the two pictures."},
        ],
    }
]
# The same conversation in transformers' part format, for the processor path.
HF_MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": IMAGE_A},
            {"type": "image", "image": IMAGE_B},
            {"type": "text", "text": "Compare the two pictures."},
        ],
    }
]
TEXT_MESSAGES = [{"role": "user", "content": "Hello there, who are you?"}]


def processor_inputs(processor, messages, **kwargs):
    return processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True, **kwargs
    )


def greedy_answer(model, processor, inputs, max_new_tokens: int = 4) -> str:
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def assert_generate_inputs(call: dict, expected) -> None:
    for key in expected:
        assert torch.equal(call[key].cpu(), expected[key]), key


# ----------------------------------------------------------------------------------------------------------------------
# The official chat() API
# ----------------------------------------------------------------------------------------------------------------------


def test_chat_official_messages(model, processor):
    answer = model.chat(OFFICIAL_MESSAGES, processor.tokenizer, processor.image_processor, **GREEDY)
    assert isinstance(answer, str) and answer
    assert answer == greedy_answer(model, processor, processor_inputs(processor, HF_MESSAGES))


def test_chat_is_processor_plus_generate(tiny_model, tiny_processor):
    """chat() feeds generate exactly the processor's tensors (both encoders): no second preprocessing path."""
    with recording_generate(tiny_model) as calls:
        tiny_model.chat(OFFICIAL_MESSAGES, tiny_processor.tokenizer, tiny_processor.image_processor, **GREEDY)
    (call,) = calls
    expected = processor_inputs(tiny_processor, HF_MESSAGES)
    assert set(call) == set(expected) | set(GREEDY)
    assert_generate_inputs(call, expected)
    assert int((call["input_ids"] == IMAGE_TOKEN_ID).sum()) == int(call["image_grid_hw"].prod(-1).sum()) // 4


@pytest.mark.parametrize("flag", ["thinking", "Thinking"])
def test_chat_thinking(model, processor, flag):
    with recording_generate(model) as calls:
        answer = model.chat(TEXT_MESSAGES, processor.tokenizer, processor.image_processor, **{flag: True}, **GREEDY)
    expected = processor_inputs(processor, TEXT_MESSAGES, enable_thinking=True)
    assert_generate_inputs(calls[0], expected)
    assert flag not in calls[0]
    assert processor.decode(calls[0]["input_ids"][0]).endswith("<|im_start|>assistant\n<think>")
    assert answer.startswith("<think>")
    assert answer == "<think>" + greedy_answer(model, processor, expected)


def test_chat_thinking_both_spellings(model, processor):
    """Code ported from both README variants may pass both switches; neither may leak into generate()."""
    answer = model.chat(
        TEXT_MESSAGES, processor.tokenizer, processor.image_processor, thinking=True, Thinking=True, **GREEDY
    )
    assert answer.startswith("<think>")


def test_chat_official_double_header(model, processor):
    with recording_generate(model) as calls:
        answer = model.chat(OFFICIAL_MESSAGES, processor.tokenizer, processor.image_processor,
                            official_double_header=True, **GREEDY)  # fmt: skip
    expected = processor_inputs(processor, HF_MESSAGES, official_double_header=True)
    assert_generate_inputs(calls[0], expected)
    prompt = processor.decode(calls[0]["input_ids"][0])
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n<|im_start|>assistant\n")
    single = processor_inputs(processor, HF_MESSAGES)
    assert calls[0]["input_ids"].shape[1] > single["input_ids"].shape[1]
    assert answer == greedy_answer(model, processor, expected)


def test_chat_batch_matches_single(model, processor):
    conversations = [OFFICIAL_MESSAGES, TEXT_MESSAGES]
    answers = model.chat(conversations, processor.tokenizer, processor.image_processor, **GREEDY)
    singles = [model.chat(c, processor.tokenizer, processor.image_processor, **GREEDY) for c in conversations]
    assert isinstance(answers, list) and len(answers) == 2
    assert answers == singles
    assert singles[0] != singles[1]  # the lively model answers differently: the comparison can fail


def test_chat_image_options_not_forwarded(model, processor):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": random_image(448, 448)}, {"type": "text", "text": "?"}]}
    ]
    with recording_generate(model) as calls:
        answer = model.chat(messages, processor.tokenizer, processor.image_processor,
                            resize_mode="eval", max_size=1792, **GREEDY)  # fmt: skip
    assert not {"resize_mode", "max_size"} & set(calls[0])
    assert int((calls[0]["input_ids"] == IMAGE_TOKEN_ID).sum()) == 256  # spec table 7.3, eval column
    expected = processor_inputs(processor, messages, resize_mode="eval", max_size=1792)
    assert_generate_inputs(calls[0], expected)
    assert answer == greedy_answer(model, processor, expected)


def test_chat_with_official_clip_image_processor(model, processor):
    """The official README flow passes transformers' CLIPImageProcessor (CLIP mean/std) as the image processor."""
    clip = CLIPImageProcessor(image_mean=CLIP_MEAN, image_std=CLIP_STD)
    with recording_generate(model) as calls:
        answer = model.chat(OFFICIAL_MESSAGES, processor.tokenizer, clip, **GREEDY)
    assert_generate_inputs(calls[0], processor_inputs(processor, HF_MESSAGES))
    assert answer == model.chat(OFFICIAL_MESSAGES, processor.tokenizer, processor.image_processor, **GREEDY)


def test_chat_refuses_remote_images_by_default(model, processor):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]
    with pytest.raises(ValueError, match="allow_remote"):
        model.chat(messages, processor.tokenizer, processor.image_processor, **GREEDY)


def test_completion_equals_generate(model, processor):
    prompt = "<|im_start|>user\n<image>Describe this.<|im_end|>\n<|im_start|>assistant\n"
    answer = model.completion(prompt, [IMAGE_A], processor.tokenizer, processor.image_processor,
                              max_new_tokens=3, do_sample=False)  # fmt: skip
    inputs = processor(text=prompt, images=[IMAGE_A], return_tensors="pt")
    assert answer == greedy_answer(model, processor, inputs, max_new_tokens=3)
    with pytest.raises(ValueError):  # one <image> marker, two images
        model.completion(prompt, [IMAGE_A, IMAGE_B], processor.tokenizer, processor.image_processor, **GREEDY)


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline and streaming
# ----------------------------------------------------------------------------------------------------------------------


def test_pipeline_matches_generate(model, processor, lively_repo):
    pipe = pipeline("image-text-to-text", model=str(lively_repo), trust_remote_code=True)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": IMAGE_A}, {"type": "text", "text": "Describe."}]}
    ]
    expected = greedy_answer(model, processor, processor_inputs(processor, messages))
    # The pipeline drops a top-level `do_sample` (4.57 and 5.x alike) and the repo's generation_config samples,
    # so greedy decoding has to go through `generate_kwargs` (which then must hold max_new_tokens too).
    options = {"generate_kwargs": {"max_new_tokens": 4, "do_sample": False}}
    (result,) = pipe(text=messages, return_full_text=False, **options)
    assert result["generated_text"] == expected
    (result,) = pipe(text=messages, **options)
    assert result["generated_text"][-1] == {"role": "assistant", "content": expected}


def test_streaming_matches_greedy(model, processor):
    inputs = processor_inputs(processor, HF_MESSAGES)
    expected = greedy_answer(model, processor, inputs, max_new_tokens=8)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    kwargs = {**inputs, "max_new_tokens": 8, "do_sample": False, "streamer": streamer}
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert expected and "".join(pieces) == expected


# ----------------------------------------------------------------------------------------------------------------------
# Loading without flash-attn, offline
# ----------------------------------------------------------------------------------------------------------------------

OFFLINE_SCRIPT = """
import sys
{shim}
try:
    import flash_attn
    raise SystemExit("flash_attn is importable")
except ImportError:
    pass
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder = {folder!r}
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = {{"type": "image", "image": Image.new("RGB", (64, 48))}}
messages = [{{"role": "user", "content": [image, {{"type": "text", "text": "Hi"}}]}}]
inputs = processor.apply_chat_template(
    messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
)
output = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
assert output.shape[1] == inputs["input_ids"].shape[1] + 2, output.shape
print("generated", output.shape[1] - inputs["input_ids"].shape[1])
"""


def test_loads_offline_without_flash_attn(tiny_repos):
    # Simulate absence when flash-attn happens to be installed: a None entry in sys.modules makes imports fail.
    shim = 'sys.modules["flash_attn"] = None' if importlib.util.find_spec("flash_attn") is not None else ""
    code = OFFLINE_SCRIPT.format(shim=shim, folder=str(tiny_repos["siglip2"]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated 2" in result.stdout
