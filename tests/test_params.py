"""Parameter counts: meta-device ViT-B/16 models equal the closed forms and the known CLIP sizes."""

from __future__ import annotations

import json

import pytest

from peft_mmap.apps.cli import main
from peft_mmap.apps.params import (
    PAPER_SIZE_NOTES,
    clip_config,
    count_method_parameters,
    markdown_table,
    paper_parameters,
    size_options,
)
from peft_mmap.baselines import METHODS
from peft_mmap.baselines.bitfit import clip_bias_parameters
from peft_mmap.baselines.full_ft import clip_parameters


@pytest.fixture(scope="module")
def vit_b16_counts() -> dict[str, int]:
    return count_method_parameters("vit-b16", tasks=4, groups=2)


def test_every_method_equals_its_closed_form_on_vit_b16(vit_b16_counts):
    config = clip_config("vit-b16")
    assert set(vit_b16_counts) == set(METHODS)
    for name, count in vit_b16_counts.items():
        assert count == METHODS[name].parameters(config, 4, 2), name


def test_vit_b16_counts_match_hand_computed_values(vit_b16_counts):
    assert vit_b16_counts["zeroshot"] == 0
    assert vit_b16_counts["full_ft_mt"] == 149_620_736  # paper: 149.62M (logit scale frozen)
    assert vit_b16_counts["full_ft"] == 4 * 149_620_736  # paper: 598.48M
    assert vit_b16_counts["bitfit"] == 171_008  # paper: 0.17M
    assert vit_b16_counts["coop_mt"] == 16 * 512  # paper: 0.01M
    assert vit_b16_counts["coop"] == 4 * 16 * 512
    assert vit_b16_counts["vpt_mt"] == 12 * 8 * 768
    assert vit_b16_counts["maple_mt"] == 9 * (2 * 512 + 512 * 768 + 768)  # about 3.55M
    assert vit_b16_counts["clip_adapter"] == 2 * 512 * 128
    assert vit_b16_counts["mmap"] == (2 + 4) * 12 * (2 * 8 + 2 * (64 + 96))
    assert vit_b16_counts["joint_prompts"] == (2 + 4) * 12 * 4 * (512 + 768)


@pytest.mark.parametrize(
    ("arch", "total", "biases"),
    [("vit-b32", 151_277_313, 171_008), ("vit-b16", 149_620_737, 171_008), ("vit-l14", 427_616_513, None)],
)
def test_clip_closed_forms_match_the_released_model_sizes(arch, total, biases):
    config = clip_config(arch)
    assert clip_parameters(config) == total
    if biases is not None:
        assert clip_bias_parameters(config) == biases


def test_tiny_clip_closed_forms_match_the_model():
    from conftest import make_clip

    clip = make_clip()
    assert clip_parameters(clip.config) == sum(p.numel() for p in clip.parameters())
    biases = sum(p.numel() for n, p in clip.named_parameters() if n.endswith(".bias"))
    assert clip_bias_parameters(clip.config) == biases


def test_params_command_prints_the_table_and_writes_json(tmp_path, capsys):
    argv = [
        "params",
        "--arch",
        "vit-b32",
        "--tasks",
        "2",
        "--groups",
        "1",
        "--json",
        str(tmp_path / "p.json"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| `mmap` | Ours |" in out and "149.62M" in out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["arch"] == "vit-b32" and data["methods"]["coop_mt"] == 16 * 512
    assert data["methods"]["mmap"] == (1 + 2) * 12 * (2 * 8 + 2 * (64 + 96))


def test_markdown_table_and_unknown_arch():
    table = markdown_table("vit-b16", {"bitfit": 171_008})
    assert "| `bitfit` | BitFit | 171,008 (0.17M) | 0.17M |" in table
    with pytest.raises(ValueError, match="Unknown arch"):
        clip_config("rn50")


@pytest.fixture(scope="module")
def paper_counts() -> dict[str, int]:
    return count_method_parameters("vit-b16", tasks=4, groups=2, sizes="paper")


def test_paper_sizes_are_within_ten_percent_of_table_1(paper_counts):
    compared = 0
    for name, count in paper_counts.items():
        paper = paper_parameters(name)
        if paper:
            assert abs(count / paper - 1) <= 0.10, (name, count, paper)
            compared += 1
    assert compared == 11  # every Table 1 column with a count (ZeroShot has none)
    assert set(PAPER_SIZE_NOTES) >= {n for n in METHODS if METHODS[n].paper_column} - {"zeroshot", "bitfit"}


def test_paper_sizes_match_the_hand_computed_budgets_and_the_closed_forms(paper_counts):
    assert paper_counts["coop_mt"] == 20 * 512 and paper_counts["coop"] == 4 * 20 * 512
    assert paper_counts["vpt_mt"] == 12 * 18 * 768 and paper_counts["vpt"] == 4 * 12 * 18 * 768
    assert paper_counts["maple_mt"] == 12 * (2 * 512 + 512 * 768 + 768)
    assert paper_counts["clip_adapter"] == 4 * 2 * 512 * 128
    assert paper_counts["mmap"] == (2 + 4) * 12 * (2 * 8 + 11 * (64 + 96)) == 127_872
    config = clip_config("vit-b16")
    options = size_options("paper")
    for name, count in paper_counts.items():
        assert count == METHODS[name].parameters(config, 4, 2, **options[name]), name
    assert count_method_parameters("vit-b16", 4, 2, ["coop_mt"]) == {
        "coop_mt": 16 * 512
    }  # defaults unchanged


def test_params_command_prints_the_paper_sizes(tmp_path, capsys):
    assert main(["params", "--arch", "vit-b16", "--sizes", "paper", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "| `mmap` | Ours | 127,872 (0.13M) | 0.13M | -1.6 % | b=22" in out
    assert "| `vpt` | VPT | 663,552 (0.66M) | 0.68M | -2.4 % |" in out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["sizes"] == "paper" and data["methods"]["maple_mt"] == 4_740_096
