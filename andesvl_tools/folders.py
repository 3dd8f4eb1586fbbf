"""Writing model folders without ever destroying an input: build in a sibling folder, swap it in at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def staged_folder(output: Path):
    """Yield an empty sibling folder of `output`; if the block succeeds it replaces `output` (the old one is removed
    only after the swap), otherwise it is deleted and `output` stays as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.new-"))
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    backup = output.parent / f".{output.name}.old-{staged.name.rsplit('-', 1)[-1]}"
    if output.exists():
        os.replace(output, backup)
    os.replace(staged, output)
    shutil.rmtree(backup, ignore_errors=True)


def overlap_error(output: Path, source: Path, allow_inside: bool = False) -> str | None:
    """Why writing `output` could destroy `source` (it is it, contains it or, unless `allow_inside`, lies inside it),
    or None when the two folders are apart."""
    out, src = Path(output).resolve(), Path(source).resolve()
    if out == src:
        return f"{output} is {source}"
    if src.is_relative_to(out):
        return f"{output} contains {source}"
    if out.is_relative_to(src) and not allow_inside:
        return f"{output} lies inside {source}"
    return None
