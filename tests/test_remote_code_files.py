"""The remote-code files at the root import one way, and transformers copies every file a module needs.

Arrows: configuration <- modeling; image processing <- processing; the conveniences (`chat_andesvl.py`: the
official chat API, `adapters_andesvl.py`: the 1+N helpers) import the processor or the quantized layer but never the
model; the model composes them as mixins. transformers 4.57 copies only the relative imports a module names itself
when it loads a local folder (it follows them recursively from the Hub cache), so both loads run in a fresh module
cache here, with only the model loaded through remote code.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

from andesvl_tools import build_repo
from conftest import ROOT

# file -> the sibling files it may import at run time (relative imports outside `if TYPE_CHECKING:`)
ALLOWED = {
    "configuration_andesvl.py": set(),
    "image_processing_andesvl.py": set(),
    "quantization_andesvl.py": set(),
    "processing_andesvl.py": {"image_processing_andesvl"},
    "adapters_andesvl.py": {"quantization_andesvl"},  # the quantized layer type that its LoRA layer wraps
    "chat_andesvl.py": {"processing_andesvl", "image_processing_andesvl"},
    "modeling_andesvl.py": {"configuration_andesvl", "quantization_andesvl", "adapters_andesvl", "chat_andesvl"},
}


def runtime_relative_imports(path) -> set[str]:
    """Sibling modules a file imports when it runs (imports under `if TYPE_CHECKING:` excluded)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for statement in block.body
        for node in ast.walk(statement)
    }
    return {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and id(node) not in skipped
    }


def test_the_remote_code_imports_run_one_way():
    assert set(ALLOWED) == set(build_repo.REMOTE_CODE_FILES)
    for name, allowed in ALLOWED.items():
        imports = runtime_relative_imports(ROOT / name)
        assert imports <= allowed, f"{name} imports {sorted(imports - allowed)}"
    assert not any("modeling_andesvl" in runtime_relative_imports(ROOT / name) for name in ALLOWED)


CHAT_WITH_THE_MODEL_ONLY = """
import sys
from transformers import AutoModelForImageTextToText, AutoTokenizer, CLIPImageProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
image_processor = CLIPImageProcessor()  # the official README's image processor: no remote code
messages = [{"role": "user", "content": [{"type": "image", "path": sys.argv[2]},
                                         {"type": "text", "text": "what color is the shape?"}]}]
print("ANSWER", repr(model.chat(messages, tokenizer, image_processor, max_new_tokens=3, do_sample=False)))
print("ADAPTERS", model.available_adapters())
"""


@pytest.mark.parametrize("source", ["local folder", "hub cache"])
def test_a_fresh_module_cache_gets_every_file_the_model_needs(tmp_path, source):
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    repo = str(ROOT / "AndesVL-Tiny")
    if source == "hub cache":
        snapshot = tmp_path / "hub" / "models--org--AndesVL-Tiny" / "snapshots" / ("b" * 40)
        shutil.copytree(ROOT / "AndesVL-Tiny", snapshot, symlinks=False, ignore=shutil.ignore_patterns("eval"))
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text("b" * 40)
        env["HF_HUB_CACHE"], repo = str(tmp_path / "hub"), "org/AndesVL-Tiny"
    image = ROOT / "assets/andesvl-tiny/images/vqa_0.png"
    run = subprocess.run(
        [sys.executable, "-c", CHAT_WITH_THE_MODEL_ONLY, repo, str(image)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ANSWER '" in run.stdout and "ADAPTERS ['gui', 'gui-qalft-int4', 'ocr', 'ocr-qalft-int4']" in run.stdout
    copied = {path.name for path in (tmp_path / "modules").rglob("*_andesvl.py")}
    assert copied == set(ALLOWED), sorted(copied)
