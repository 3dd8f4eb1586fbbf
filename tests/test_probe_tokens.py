"""andesvl_tools/probe_tokens.py: the read-outs recover what is there and find nothing where nothing is; the CLI runs
on a
tiny random repo and small generated GUI data."""

from __future__ import annotations

import json

import pytest
import torch

from andesvl_tools import make_datasets, probe_tokens, train


def grid_tokens(rows: int, cols: int, width: int, seed: int, with_position: bool) -> dict[str, torch.Tensor]:
    """Tokens of one rows x cols screen: noise, plus (row, column) written into two channels when asked."""
    positions = train.token_positions(torch.tensor([[rows * 2, cols * 2]]), 2)
    tokens = torch.randn(rows * cols, width, generator=torch.Generator().manual_seed(seed))
    if with_position:
        tokens[:, :2] += 20 * positions
    return {"tokens": tokens, "positions": positions}


def test_position_read_out_finds_position_only_where_it_is_written():
    written = probe_tokens.ridge_position(grid_tokens(12, 6, 16, 0, True), grid_tokens(12, 6, 16, 1, True), 1e-2)
    noise = probe_tokens.ridge_position(grid_tokens(12, 6, 16, 0, False), grid_tokens(12, 6, 16, 1, False), 1e-2)
    assert written["r2_row"] > 0.9 and written["r2_column"] > 0.9
    assert noise["r2_row"] < 0.2 and noise["r2_column"] < 0.2
    assert noise["error_row"] > 5 * written["error_row"]


def test_label_read_out_separates_coded_labels_and_not_shuffled_ones():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 20, (3000,), generator=generator)
    coded = torch.nn.functional.one_hot(labels, 32).float() * 5 + torch.randn(3000, 32, generator=generator)
    fit = probe_tokens.softmax_label(coded[:2000], labels[:2000], coded[2000:], labels[2000:], steps=200, seed=0)
    shuffled = labels[torch.randperm(3000, generator=generator)]
    chance = probe_tokens.softmax_label(coded[:2000], shuffled[:2000], coded[2000:], shuffled[2000:], steps=200, seed=0)
    assert fit["accuracy"] > 0.9
    assert chance["accuracy"] < 0.15


@pytest.fixture(scope="module")
def gui_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("probe") / "data"
    make_datasets.main(["--output", str(data), "--small", "--tasks", "gui"])
    return data


def test_probe_cli_on_a_tiny_repo_writes_every_number(tiny_repos, gui_data, tmp_path, capsys):
    output = tmp_path / "probe.json"
    results = probe_tokens.main(
        [
            "--model",
            str(tiny_repos["aimv2"]),
            "--data",
            str(gui_data),
            "--position-screens",
            "8",
            "--label-fit-screens",
            "16",
            "--label-score-screens",
            "8",
            "--label-steps",
            "20",
            "--num-threads",
            "1",
            "--output",
            str(output),
        ]
    )
    assert json.loads(output.read_text()) == results
    assert set(results["position"]) == {"r2_row", "r2_column", "error_row", "error_column"}
    label = results["label"]
    assert label["classes"] == len(train.GUI_LABELS) and 0 < label["classes_seen"] <= label["classes"]
    assert label["fit_tokens"] > 16 and label["scored_tokens"] > 8  # every screen has several label tokens
    for read_out in (label["visual_tokens"], label["raw_pixels"]):
        assert 0 <= read_out["accuracy"] <= 1 and 0 <= read_out["fit_accuracy"] <= 1
    assert "| label | raw pixels |" in capsys.readouterr().out


def test_probe_cli_names_missing_data_and_short_splits(tiny_repos, gui_data, tmp_path):
    model = ["--model", str(tiny_repos["aimv2"])]
    with pytest.raises(SystemExit, match="no GUI split"):
        probe_tokens.main([*model, "--data", str(tmp_path)])
    with pytest.raises(SystemExit, match="has 8 screens, fewer than the 40 asked for"):
        probe_tokens.main([*model, "--data", str(gui_data)])
    with pytest.raises(SystemExit):
        probe_tokens.parse_args([*model, "--data", str(gui_data), "--position-screens", "1"])
