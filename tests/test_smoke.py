"""The smoke inputs (a random-weight CLIP of real shapes, a generated dataset folder) and the examples' SMOKE runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from peft_mmap.apps.cli import main
from peft_mmap.apps.params import clip_config
from peft_mmap.apps.smoke import IMAGE_SIZES, save_random_clip, write_smoke_images, write_smoke_inputs
from peft_mmap.base_models import load_clip_model
from peft_mmap.classifier import load_clip_processor
from peft_mmap.data import OFFICE_HOME_DOMAINS, load_task_folders

ROOT = Path(__file__).resolve().parents[1]
TABLE_METHODS = {
    "zeroshot", "full_ft", "coop", "vpt", "maple", "full_ft_mt", "clip_adapter", "bitfit", "coop_mt", "vpt_mt",
    "maple_mt", "mmap",
}  # fmt: skip


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory) -> Path:
    return save_random_clip(tmp_path_factory.mktemp("smoke") / "model", "vit-b16", seed=3)


def test_the_random_clip_has_vit_b16_shapes_and_loads_as_a_checkpoint_folder(vit_b16):
    expected = clip_config("vit-b16")
    model = load_clip_model(vit_b16)
    for tower in ("text_config", "vision_config"):
        got, want = getattr(model.config, tower), getattr(expected, tower)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            assert getattr(got, key) == getattr(want, key), (tower, key)
    assert (model.config.vision_config.image_size, model.config.vision_config.patch_size) == (224, 16)
    assert model.config.text_config.max_position_embeddings == 77
    assert sum(p.numel() for p in model.parameters()) == 149_620_737  # CLIP ViT-B/16's count
    processor = load_clip_processor(vit_b16)
    pixels = processor(images=Image.new("RGB", (300, 224)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    tokenizer = processor.tokenizer
    assert (
        tokenizer.model_max_length == 77 and model.config.text_config.eos_token_id == tokenizer.eos_token_id
    )
    tokens = tokenizer(["a photo of a cat.", "a photo of a desk lamp."], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.text_model(**tokens).last_hidden_state
        pooled = model.text_model(**tokens).pooler_output
    eos = (tokens["input_ids"] == tokenizer.eos_token_id).int().argmax(-1)  # the first EOS: CLIP pools there
    torch.testing.assert_close(pooled, hidden[torch.arange(2), eos])
    assert (
        eos.tolist() != [tokens["input_ids"].shape[1] - 1] * 2
    )  # the shorter prompt is padded after its EOS
    assert all(oct(f.stat().st_mode & 0o777) == oct(0o666 & ~_umask()) for f in vit_b16.iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_office_home_folder_has_the_layout_and_real_image_sizes_and_is_deterministic(tmp_path):
    data = write_smoke_images(tmp_path / "a", "officehome", classes=3, images_per_class=4, seed=5)
    assert sorted(p.name for p in data.iterdir()) == ["Art", "Clipart", "Product", "Real World"]
    folders = load_task_folders(data, "officehome")  # refuses non-Office-Home classes
    assert list(folders) == list(OFFICE_HOME_DOMAINS)
    assert folders["real_world"].classnames == ["alarm clock", "desk lamp", "push pin"]
    images = folders["art"].images[0]
    assert len(images) == 4 and [Image.open(p).size for p in images[:3]] == list(IMAGE_SIZES)
    again = write_smoke_images(tmp_path / "b", "officehome", classes=3, images_per_class=4, seed=5)
    files = sorted(p.relative_to(data) for p in data.rglob("*.jpg"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.jpg")) and len(files) == 48
    assert all((data / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = write_smoke_images(tmp_path / "c", "officehome", classes=3, images_per_class=4, seed=6)
    assert (other / files[0]).read_bytes() != (data / files[0]).read_bytes()
    first, second = (
        Image.open(p).convert("RGB") for p in folders["art"].images[0][:1] + folders["art"].images[1][:1]
    )
    assert first.tobytes() != second.tobytes()


def test_mini_domainnet_folder_has_its_split_files(tmp_path):
    data = write_smoke_images(tmp_path / "dn", "domainnet", classes=2, images_per_class=3)
    split_dir = data / "splits_mini"
    assert sorted(p.name for p in split_dir.iterdir()) == sorted(
        f"{d}_{s}.txt" for d in ("clipart", "painting", "real", "sketch") for s in ("train", "test")
    )
    assert (split_dir / "sketch_train.txt").read_text().splitlines() == [
        "sketch/aircraft_carrier/sketch_000_000000.jpg 0",
        "sketch/teddy-bear/sketch_001_000000.jpg 1",
    ]
    folders = load_task_folders(data, "domainnet", split_dir)
    assert list(folders) == ["clipart", "painting", "real", "sketch"]
    assert folders["painting"].classnames == ["aircraft carrier", "teddy bear"]
    assert [len(i) for i in folders["painting"].images] == [3, 3]


def test_bad_smoke_inputs_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="Unknown smoke layout 'generic'"):
        write_smoke_images(tmp_path, "generic")
    with pytest.raises(ValueError, match="classes must be between 1 and 4 for domainnet, got 5"):
        write_smoke_images(tmp_path, "domainnet", classes=5)
    with pytest.raises(ValueError, match="images_per_class must be at least 2"):
        write_smoke_images(tmp_path, "officehome", images_per_class=1)
    with pytest.raises(ValueError, match="Unknown arch 'vit-h14'"):
        write_smoke_inputs(tmp_path / "x", "officehome", arch="vit-h14")
    assert not (tmp_path / "x").exists()


def test_smoke_inputs_command_writes_both_folders_and_refuses_bad_values(tmp_path, capsys):
    assert main(["smoke-inputs", "--layout", "domainnet", "--arch", "tiny", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"model: {tmp_path / 'model'}", f"data: {tmp_path / 'data'}", f"split dir: {tmp_path / 'data' / 'splits_mini'}"
    ]  # fmt: skip
    assert load_clip_model(tmp_path / "model").config.vision_config.image_size == 32
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "clipart", "painting", "real", "sketch", "splits_mini"
    ]  # fmt: skip
    for bad, message in (
        (["--layout", "generic"], "invalid choice: 'generic'"),
        (
            ["--layout", "officehome", "--classes", "5"],
            "classes must be between 1 and 4 for officehome, got 5",
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["smoke-inputs", *bad, "--arch", "tiny", "--output", str(tmp_path / "bad")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def run_smoke_script(script: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SMOKE="1", OUT=str(out), PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / script)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "table", "tasks"),
    [
        ("officehome.sh", "Table 1 (10%", ["art", "clipart", "product", "real_world"]),
        ("minidomainnet.sh", "Table 2 (1%", ["clipart", "painting", "real", "sketch"]),
    ],
)
def test_smoke_run_of_the_example_runs_every_command_and_prints_the_comparison(
    tmp_path, script, table, tasks
):
    done = run_smoke_script(script, tmp_path / "out")
    out = tmp_path / "out"
    results = json.loads((out / "bench" / "results.json").read_text())
    assert set(results["methods"]) == TABLE_METHODS
    assert all(list(entry["tasks"]) == tasks for entry in results["methods"].values())
    assert results["methods"]["mmap"]["recipe"]["protocol"] == "paper"
    assert (
        results["preset"]["name"] == "paper"
        and results["preset"]["overrides"]["train.batch_size"]["used"] == 1
    )
    assert results["sizes"]["mmap"]["config"]["prompt_length"] == 22 and results["sizes"]["coop"] == {
        "n_ctx": 20
    }
    assert results["methods"]["full_ft_mt"]["trainable_params"] == 149_620_736  # ViT-B/16 shapes
    assert json.loads((out / "groups.json").read_text())["task_names"] == tasks
    assert set(json.loads((out / "adapters" / "results.json").read_text())["methods"]) == {"zeroshot", "mmap"}
    assert f"Ours / paper, {table}" in done.stdout and "| Ours (`mmap`) |" in done.stdout
    assert (out / "paper_comparison.md").read_text() in done.stdout
