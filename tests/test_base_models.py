"""Model references: the shipped tiny CLIP's portable name, and loading that fails fast without a Hub.

The tests that need a Hub point ``HF_ENDPOINT`` at a local port (closed, or open and never answering), in a
fresh process, so they behave the same with or without a network and no traffic leaves the machine.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import CLOSED_PORT_ENDPOINT, hub_env, unanswered_hub
from peft import PeftModel, get_peft_model
from transformers import CLIPModel

from peft_mmap import MmAPConfig, MultiTaskMmAP, load_tiny_clip
from peft_mmap.base_models import (
    TINY_CLIP_NAME,
    TINY_CLIP_PATH,
    load_clip_model,
    portable_model_name,
    resolve_model,
)
from peft_mmap.manifest import MANIFEST_NAME

UNREACHABLE = "no network: the Hugging Face Hub"


def test_the_portable_name_resolves_to_the_shipped_tiny_clip(tmp_path, monkeypatch):
    source = resolve_model(TINY_CLIP_NAME)
    assert Path(source.name) == TINY_CLIP_PATH and source.local_files_only
    monkeypatch.chdir(TINY_CLIP_PATH.parent)
    for path in (TINY_CLIP_PATH, str(TINY_CLIP_PATH) + "/", "tiny-clip", "../assets/tiny-clip"):
        assert portable_model_name(path) == TINY_CLIP_NAME, path
    assert portable_model_name(tmp_path) == str(tmp_path)  # a user's own folder stays the path it was given
    assert portable_model_name("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert portable_model_name(None) is None


def test_adapters_on_the_shipped_tiny_clip_record_its_portable_name_and_load_back(tmp_path):
    clip, processor = load_tiny_clip()
    model = get_peft_model(clip, MmAPConfig(), adapter_name="one")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mmap_" in name:
                param.normal_()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == TINY_CLIP_NAME
    inputs = {
        **processor.tokenizer(["a photo of a circle"], return_tensors="pt"),
        "pixel_values": torch.randn(1, 3, 48, 48),
    }
    loaded = PeftModel.from_pretrained(load_clip_model(saved["base_model_name_or_path"]), tmp_path / "one")
    expected = model(**inputs).logits_per_image
    torch.testing.assert_close(loaded(**inputs).logits_per_image, expected)


def test_the_tiny_clip_loaded_from_its_folder_by_transformers_records_the_portable_name_too(tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(TINY_CLIP_PATH), MmAPConfig())
    model.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
        == TINY_CLIP_NAME
    )


def test_a_user_folder_is_recorded_as_given(workspace, tmp_path):
    model = get_peft_model(
        load_clip_model(workspace / "model"), MmAPConfig(prompt_length=2, source_shape=(1, 8))
    )
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(workspace / "model")  # as PEFT records a folder


def test_multi_task_adapters_on_the_tiny_clip_name_it_in_manifest_configs_and_card(tmp_path):
    clip, processor = load_tiny_clip()
    tasks = {"shapes": ["circle", "square"], "fruit": ["apple", "pear"]}
    model = MultiTaskMmAP(clip, processor.tokenizer, tasks, [["shapes", "fruit"]])
    folder = model.save_pretrained(tmp_path / "adapters")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["base_model"] == TINY_CLIP_NAME
    for name in manifest["adapters"]:
        config = json.loads((folder / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == TINY_CLIP_NAME
    card = (folder / "README.md").read_text()
    assert str(TINY_CLIP_PATH) not in card and f'load_clip_model("{TINY_CLIP_NAME}")' in card
    assert "base_model:" not in card  # the Hub accepts only Hub ids there
    reloaded = MultiTaskMmAP.from_pretrained(manifest["base_model"], folder)
    pixels = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(reloaded(pixels, "fruit"), model.eval()(pixels, "fruit"))


def run_fresh(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


LOAD = (
    "from peft_mmap.base_models import load_clip_model\n"
    "from peft_mmap.classifier import load_clip_processor\n"
    "clip = load_clip_model({ref!r}); processor = load_clip_processor({ref!r})\n"
    "print('LOADED', clip.name_or_path, type(processor).__name__)\n"
)


def test_a_hub_id_fails_at_once_with_one_message_when_the_hub_refuses_connections(tmp_path):
    result = run_fresh(LOAD.format(ref="someorg/no-such-model"), hub_env(CLOSED_PORT_ENDPOINT, tmp_path))
    assert result.returncode == 1 and "LOADED" not in result.stdout
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"OSError: someorg/no-such-model: {UNREACHABLE} ({CLOSED_PORT_ENDPOINT}) ")
    assert "a local folder" in error and "save_pretrained" in error and "HF_HUB_OFFLINE=1" in error


def cache_model(folder: Path, hf_home: Path, repo_id: str) -> None:
    """Put the checkpoint in ``folder`` into the Hub cache under ``hf_home`` as ``repo_id``'s main revision."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_cached_model_loads_without_retrying_a_hub_that_does_not_answer(workspace, tmp_path):
    cache_model(workspace / "model", tmp_path, "someorg/cached")
    with unanswered_hub() as (endpoint, requests):
        result = run_fresh(LOAD.format(ref="someorg/cached"), hub_env(endpoint, tmp_path))
        repo_requests = [line for line in requests() if "someorg/cached" in line]
    assert result.returncode == 0, result.stderr
    assert "LOADED someorg/cached CLIPProcessor" in result.stdout
    # One metadata request per loader, no retry, and nothing asked of the Hub by transformers afterwards.
    assert repo_requests == ["HEAD /someorg/cached/resolve/main/config.json"] * 2


def test_an_uncached_hub_id_that_does_not_answer_is_asked_once(tmp_path):
    with unanswered_hub() as (endpoint, requests):
        result = run_fresh(LOAD.format(ref="someorg/no-such-model"), hub_env(endpoint, tmp_path))
        repo_requests = [line for line in requests() if "someorg/no-such-model" in line]
    assert result.returncode == 1 and f"someorg/no-such-model: {UNREACHABLE}" in result.stderr
    assert "ReadTimeout" in result.stderr
    assert repo_requests == ["HEAD /someorg/no-such-model/resolve/main/config.json"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder (404 for anything not in it) without logging each request."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_hub_that_answers_leaves_loading_to_transformers_as_before(workspace, tmp_path):
    """Any answer (here 404: no such repository) means the Hub was reached: the reference goes to
    transformers unchanged, cached or not, and transformers reports a missing repository itself."""
    cache_model(workspace / "model", tmp_path, "someorg/cached")
    (tmp_path / "empty").mkdir()
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "empty"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {
            **hub_env(f"http://127.0.0.1:{server.server_address[1]}", tmp_path),
            "HF_HUB_ETAG_TIMEOUT": "60",
        }
        code = "from peft_mmap.base_models import resolve_model\nfor r in ('someorg/cached', 'someorg/x'): print(resolve_model(r))"
        result = run_fresh(code, env)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "ModelSource(name='someorg/cached', local_files_only=False)",
        "ModelSource(name='someorg/x', local_files_only=False)",
    ]


@pytest.mark.parametrize("reference", ["/no/such/dir", "not a hub id"])
def test_references_that_are_no_hub_id_are_left_to_transformers(reference):
    source = resolve_model(reference)
    assert source.name == reference and not source.local_files_only
