"""Every Python snippet of README.md and adapters/README.md runs as written against AndesVL-Tiny.

The only substitution is the model: the Hub id `org/AndesVL-4B` becomes the AndesVL-Tiny folder, and
`org/AndesVL-4B-int4` a folder that `andesvl_tools.quantize --bits 4` makes of it (built once, when a snippet names
it). Snippets run offline in a scratch folder that holds the one input file they name (`receipt.png`, an
AndesVL-Tiny OCR example). Each snippet runs in a fresh namespace, except one introduced by "(continues the snippet
above)", which runs after the snippet before it, in the same namespace. A snippet introduced by "(runs against the
server above)" is a client of vLLM's OpenAI-compatible server: tests/test_vllm.py runs it against the server it
starts (the vLLM line), so it is left out here.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from dataclasses import dataclass

import pytest

from conftest import ROOT

READMES = ("README.md", "adapters/README.md")
HUB_ID = '"org/AndesVL-4B"'
QUANTIZED_HUB_ID = '"org/AndesVL-4B-int4"'
CONTINUES = "(continues the snippet above)"
SERVER = "(runs against the server above)"
SERVER_URL = "http://127.0.0.1:8000/v1"  # what a server snippet connects to (the test substitutes its own)
FENCE = re.compile(r"^( *)```python\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)
EXAMPLE_IMAGE = ROOT / "assets/andesvl-tiny/images/ocr_000000.png"


@dataclass
class Snippet:
    readme: str
    line: int
    code: str
    continues: bool
    server: bool = False

    @property
    def name(self) -> str:
        return f"{self.readme}:{self.line}"


def readme_snippets() -> list[Snippet]:
    snippets = []
    for readme in READMES:
        text = (ROOT / readme).read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip().splitlines()[-1] if match.start() else ""
            line = text.count("\n", 0, match.start()) + 1
            code = textwrap.dedent(match.group(2))
            snippets.append(Snippet(readme, line, code, CONTINUES in before, SERVER in before))
    return snippets


SNIPPETS = [snippet for snippet in readme_snippets() if not snippet.server]
SERVER_SNIPPETS = [snippet for snippet in readme_snippets() if snippet.server]


def chain(index: int) -> list[Snippet]:
    """The snippet and, when it continues one, every snippet it builds on (in order)."""
    snippets = [SNIPPETS[index]]
    while snippets[0].continues:
        index -= 1
        snippets.insert(0, SNIPPETS[index])
    return snippets


def test_the_readmes_have_the_snippets_this_test_expects():
    """Guards the parser: a README edit that breaks the fences must not leave this suite with nothing to run."""
    assert len(SNIPPETS) >= 7, [s.name for s in SNIPPETS]
    assert sum(s.continues for s in SNIPPETS) >= 1
    assert SERVER_SNIPPETS and all(SERVER_URL in s.code for s in SERVER_SNIPPETS), [s.name for s in SERVER_SNIPPETS]
    for snippet in SNIPPETS:
        compile(snippet.code, snippet.name, "exec")  # every snippet is Python as written


def as_literal(path) -> str:
    return repr(str(path)).replace("'", '"')


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory):
    """`org/AndesVL-4B-int4`: AndesVL-Tiny through `quantize --bits 4` (made on first use)."""
    folders = {}

    def build():
        if not folders:
            from andesvl_tools import quantize

            folders["int4"] = tmp_path_factory.mktemp("readme") / "AndesVL-Tiny-int4"
            quantize.main(["--model", str(ROOT / "AndesVL-Tiny"), "--output", str(folders["int4"]), "--bits", "4"])
        return folders["int4"]

    return build


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[s.name for s in SNIPPETS])
def test_readme_snippet_runs_against_andesvl_tiny(index, tmp_path, monkeypatch, quantized_tiny):
    tiny = as_literal(ROOT / "AndesVL-Tiny")
    shutil.copy(EXAMPLE_IMAGE, tmp_path / "receipt.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__readme__"}
    for snippet in chain(index):
        code = snippet.code.replace(HUB_ID, tiny)
        if QUANTIZED_HUB_ID in code:
            code = code.replace(QUANTIZED_HUB_ID, as_literal(quantized_tiny()))
        exec(compile(code, snippet.name, "exec"), namespace)
