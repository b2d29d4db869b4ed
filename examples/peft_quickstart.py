"""MmAP through PEFT's own verbs: two adapters active at once, save, reload, switch, unload.

python examples/peft_quickstart.py                                   # shipped tiny CLIP, offline
python examples/peft_quickstart.py --model openai/clip-vit-base-patch16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import CLIPModel, CLIPProcessor

import peft_mmap


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="hub id or folder of a CLIPModel (default: shipped tiny CLIP)"
    )
    args = parser.parse_args()
    model_id = args.model or str(peft_mmap.TINY_CLIP_PATH)

    clip = CLIPModel.from_pretrained(model_id).eval()
    # PIL explicitly: the same pixels whether or not torchvision is installed
    processor = CLIPProcessor.from_pretrained(model_id, backend="pil")
    config = peft_mmap.MmAPConfig(prompt_length=4, source_shape=(2, 8))
    model = get_peft_model(clip, config, adapter_name="group0")
    model.add_adapter("art", config)
    model.base_model.set_adapter(["group0", "art"])  # group-shared + task-specific prompts
    model.print_trainable_parameters()

    size = processor.image_processor.crop_size["height"]
    inputs = processor(text=["a photo of a cup.", "a photo of a key."], return_tensors="pt", padding=True)
    inputs["pixel_values"] = torch.rand(2, 3, size, size)
    logits = model(**inputs).logits_per_image
    print("logits with group0 + art:", logits.shape)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        print("saved:", sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file()))
        fresh = CLIPModel.from_pretrained(model_id).eval()
        loaded = PeftModel.from_pretrained(fresh, Path(tmp) / "group0", adapter_name="group0")
        loaded.load_adapter(Path(tmp) / "art", adapter_name="art")
        loaded.base_model.set_adapter(["group0", "art"], inference_mode=True)
        same = torch.allclose(loaded(**inputs).logits_per_image, logits, atol=1e-5)
        print("reloaded logits identical:", same)
    with model.disable_adapter():
        print("base CLIP logits:", model(**inputs).logits_per_image.shape)
    base = model.unload()
    print("unloaded:", type(base).__name__)


if __name__ == "__main__":
    main()
