"""MmAP's parameter count on the other families' standard sizes (meta-device models, no download)."""

from __future__ import annotations

import json

import pytest

from peft_mmap import MmAPConfig
from peft_mmap.apps.cli import main
from peft_mmap.apps.family_archs import family_table, mmap_counts
from peft_mmap.options import FAMILY_ARCHS

#: (text width, vision width, the base model's parameters in millions as its Hub page rounds them).
PUBLISHED = {
    "siglip-b16-224": (768, 768, 203),
    "siglip2-b16-256": (768, 768, 375),
    "metaclip2-b16": (512, 768, 586),
}


@pytest.mark.parametrize("arch", list(FAMILY_ARCHS))
def test_counts_equal_the_closed_form_on_the_published_shapes(arch):
    counts = mmap_counts(arch, tasks=4, groups=2)
    d_l, d_v, millions = PUBLISHED[arch]
    assert counts["tower_sizes"] == {"text": d_l, "vision": d_v}
    assert round(counts["base_parameters"] / 1e6) == millions
    assert counts["adapters"] == 2 + 4
    assert counts["per_adapter"] == 12 * (
        2 * 8 + 2 * (d_l // 8 + d_v // 8)
    )  # depth (m*n + (b/m)(d_l/n + d_v/n))
    assert counts["mmap"] == 6 * counts["per_adapter"]


def test_params_prints_mmap_next_to_clip_vit_b16(tmp_path, capsys):
    assert main(["params", "--arch", "siglip-b16-224", "--json", str(tmp_path / "counts.json")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["siglip-b16-224", "vit-b16"]
    assert "| 4,800 | 28,800 |" in rows[0] and "| 4,032 | 24,192 |" in rows[1]
    saved = json.loads((tmp_path / "counts.json").read_text())
    assert saved["arch"] == "siglip-b16-224" and saved["mmap"]["mmap"] == 28_800


def test_the_table_counts_the_config_it_is_given_on_both_models():
    table = family_table("siglip-b16-224", config=MmAPConfig(prompt_length=8, source_shape=(2, 8)))
    per_adapter = {
        row.split("`")[1]: row.split("|")[-3].strip() for row in table.splitlines() if row.startswith("| `")
    }
    assert per_adapter == {
        "siglip-b16-224": f"{12 * (16 + 4 * 192):,}",
        "vit-b16": f"{12 * (16 + 4 * 160):,}",
    }


def test_params_counts_the_paper_sizes_on_a_family_arch(tmp_path, capsys):
    """``--sizes paper`` counts the paper preset's MmAP (b = 22, 2 x 8, every layer) on both models."""
    assert (
        main(["params", "--arch", "siglip-b16-224", "--sizes", "paper", "--json", str(tmp_path / "c.json")])
        == 0
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert f"| {12 * (16 + 11 * 192):,} |" in rows[0] and "| 21,312 | 127,872 |" in rows[1]
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["sizes"] == "paper" and saved["mmap"]["mmap"] == 6 * 12 * (16 + 11 * 192)
