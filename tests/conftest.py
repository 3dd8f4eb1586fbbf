"""Shared fixtures: tiny AndesVL repos built by `andesvl_tools/build_repo.py` in folders named like real Hub repos
(with a dot), loaded through the Auto classes with `trust_remote_code=True`, exactly as Hub users load them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from andesvl_tools import build_repo  # the repo root is on sys.path by pyproject.toml's pytest `pythonpath`

ROOT = Path(__file__).resolve().parents[1]

IMAGE_TOKEN_ID = 151654
TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])


@pytest.fixture(scope="session")
def tiny_repos(tmp_path_factory) -> dict[str, Path]:
    """One tiny random repo per encoder type: {"aimv2": folder, "siglip2": folder}."""
    base = tmp_path_factory.mktemp("hub")
    repos = {}
    for vision_type, name in (("aimv2", "AndesVL-1B-tiny"), ("siglip2", "AndesVL-0.6B-tiny")):
        repos[vision_type] = base / name
        build_repo.build(None, vision_type, repos[vision_type], weights=None, link=False, seed=0)
    return repos


@pytest.fixture(scope="session", params=["aimv2", "siglip2"])
def vision_type(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_repo(tiny_repos, vision_type) -> Path:
    return tiny_repos[vision_type]


def load_model(folder: Path, **kwargs):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, **kwargs)
    return model.eval()


def load_processor(folder: Path, **kwargs):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, trust_remote_code=True, **kwargs)


@pytest.fixture(scope="session")
def tiny_model(tiny_repo):
    return load_model(tiny_repo)


@pytest.fixture(scope="session")
def tiny_processor(tiny_repo):
    return load_processor(tiny_repo)


def random_image(width: int, height: int, seed: int = 0):
    """A deterministic RGB PIL image with structure (so encoders see more than a flat colour)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def packed_inputs(config, grids: list[tuple[int, int]], seed: int = 0, text: tuple[int, ...] = (9707, 11, 1879)):
    """Random packed patches for `grids` plus one prompt holding every image span, as the processor would build."""
    vision = config.vision_config
    generator = torch.Generator().manual_seed(seed)
    grid_hw = torch.tensor(grids, dtype=torch.long)
    patch_dim = vision.num_channels * vision.patch_size**2
    pixel_values = torch.randn(int(grid_hw.prod(-1).sum()), patch_dim, generator=generator)
    ids = list(text)
    for h, w in grids:
        ids += [config.image_start_token_id] + [config.image_token_id] * (h * w // vision.merge_size**2)
        ids += [config.image_end_token_id]
    ids += [198, 3838]
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixel_values, "image_grid_hw": grid_hw}
