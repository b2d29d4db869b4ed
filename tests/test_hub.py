"""Hub upload without network: the upload calls are intercepted and the exact files are checked."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_clip
from peft import get_peft_model

import peft_mmap
from peft_mmap import MmAPConfig
from peft_mmap.hub import save_adapters


class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records what would be uploaded."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.repo_id = None

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.repo_id = repo_id
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message):
        root = Path(folder_path)
        self.files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return SimpleNamespace(commit_url=f"https://hub.example/{repo_id}/commit/1")


@pytest.fixture
def two_adapter_model(clip):
    model = get_peft_model(clip, MmAPConfig(), adapter_name="group0")
    model.add_adapter("art", MmAPConfig(text_placement="replace"))
    return model


def test_push_to_hub_uploads_peft_layout_and_model_card(two_adapter_model):
    api = RecordingApi()
    url = peft_mmap.push_to_hub(two_adapter_model, "me/officehome-mmap", api=api)
    assert url.endswith("/commit/1") and api.repo_id == "me/officehome-mmap"
    assert sorted(api.files) == [
        "README.md",
        "art/adapter_config.json",
        "art/adapter_model.safetensors",
        "group0/adapter_config.json",
        "group0/adapter_model.safetensors",
    ]
    card = api.files["README.md"].decode()
    counts = peft_mmap.adapter_parameter_counts(two_adapter_model)
    assert "library_name: peft" in card and "| `art` |" in card and "| `group0` |" in card
    assert f"{counts['art']:,}" in card and f"{sum(counts.values()):,}" in card
    assert (
        f"| all | insert | {counts['group0']:,} |" in card
        and f"| all | replace | {counts['art']:,} |" in card
    )


def test_peft_push_to_hub_uploads_the_adapter_files(two_adapter_model, monkeypatch):
    """PEFT's own ``model.push_to_hub`` goes through transformers' mixin; intercept its Hub calls."""
    import transformers.utils.hub as thub

    uploaded = {}

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **kwargs):
            uploaded.update({op.path_in_repo: op for op in operations})
            return SimpleNamespace(commit_url="u")

    monkeypatch.setattr(thub, "hf_api", lambda: Api())
    monkeypatch.setattr(thub, "create_commit", Api().create_commit, raising=False)
    monkeypatch.setattr(
        thub, "create_and_tag_model_card", lambda *a, **k: SimpleNamespace(save=lambda p: None)
    )
    two_adapter_model.push_to_hub("me/officehome-mmap")
    assert {"group0/adapter_model.safetensors", "art/adapter_model.safetensors"} <= set(uploaded)


def test_saving_looks_nothing_up_about_the_base_models_vocabulary(tmp_path):
    """PEFT's default save checks on the Hub whether the base's vocabulary changed, and warns offline (the suite
    runs under HF_HUB_OFFLINE=1) for a base named by a Hub id; MmAP adapters hold no embedding weights."""
    clip = make_clip()
    clip.name_or_path = "someorg/clip"  # as a model loaded from the Hub is named
    model = get_peft_model(clip, MmAPConfig(prompt_length=2, source_shape=(1, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapters(model, tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "someorg/clip"
    )
