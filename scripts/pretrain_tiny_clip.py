"""Pretrain the tiny CLIP shipped in ``peft_mmap/assets/tiny-clip`` (deterministic, CPU, 20 minutes on 2 quiet cores).

Usage: ``python scripts/pretrain_tiny_clip.py [--output-dir DIR] [--seed 0] [--steps N] [--image-size PX]
[--cross-domain-weight W] [--unnamed-captions] [--home-domain-share S]``.
"""

from __future__ import annotations

import argparse

from peft_mmap.apps.tiny_clip import TINY_CLIP_PATH, pretrain_tiny_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir", default=str(TINY_CLIP_PATH), help="where to save (default: the asset folder)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: the shipped run's)"
    )
    parser.add_argument("--num-pairs", type=int, default=None, help="image-caption pairs rendered")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="input pixels, a multiple of 8 (default: the shipped 48)"
    )
    parser.add_argument(
        "--cross-domain-weight",
        type=float,
        default=None,
        help="target weight of a caption for an image of its class in another style (default: the shipped 1)",
    )
    parser.add_argument(
        "--unnamed-captions",
        action="store_true",
        help="replace a share of the Clipart, Sketch and Painting captions by style-only ones (pilot world)",
    )
    parser.add_argument(
        "--home-domain-share",
        type=float,
        default=None,
        help="share of each object's pairs drawn in its home style (pilot world; default: styles independent of objects)",
    )
    args = parser.parse_args()
    given = {
        "steps": args.steps,
        "num_pairs": args.num_pairs,
        "image_size": args.image_size,
        "cross_domain_weight": args.cross_domain_weight,
        "unnamed_captions": args.unnamed_captions or None,
        "home_domain_share": args.home_domain_share,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    report = pretrain_tiny_clip(args.output_dir, seed=args.seed, num_threads=args.threads, **overrides)
    print(f"saved to {args.output_dir}")
    print(f"run time: {report['train_seconds']:.1f} s, final loss {report['final_loss']:.4f}")
    print(f"zero-shot accuracy with {report['zero_shot_template']!r}:")
    for domain, accuracy in report["zero_shot_accuracy"].items():
        print(f"  {domain:<9} {100 * accuracy:5.1f}%")


if __name__ == "__main__":
    main()
