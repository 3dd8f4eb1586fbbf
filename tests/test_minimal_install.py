"""The model loads, runs and generates with only what it needs: a venv without peft (or accelerate, flash-attn,
torchao...), built by `scripts/setup_env.sh minimal` from requirements/minimal.txt. transformers refuses a remote-code
file that imports, anywhere and at any indentation outside `try/except ImportError`, a package that is missing."""

from __future__ import annotations

import subprocess

import pytest

from conftest import ROOT

SCRIPT = r"""
import importlib.util, sys
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
assert importlib.util.find_spec("peft") is None and importlib.util.find_spec("accelerate") is None
repo = sys.argv[1]
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
messages = [{"role": "user", "content": [{"type": "image", "path": sys.argv[2]},
                                         {"type": "text", "text": "what is the red shape?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
print("ANSWER", logits.shape[-1], processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


@pytest.mark.slow
def test_loads_runs_and_generates_without_peft():
    setup = subprocess.run(
        ["bash", str(ROOT / "scripts/setup_env.sh"), "minimal"], capture_output=True, text=True, timeout=900
    )
    assert setup.returncode == 0, setup.stderr[-2000:]
    python = setup.stdout.strip().splitlines()[-1] + "/bin/python"
    image = ROOT / "assets/andesvl-tiny/images/vqa_0.png"
    run = subprocess.run(
        [python, "-c", SCRIPT, str(ROOT / "AndesVL-Tiny"), str(image)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    answer = run.stdout.split("ANSWER", 1)[1].split()
    assert answer[0] == "151936" and len(answer) > 1  # full-vocabulary logits and a non-empty answer
