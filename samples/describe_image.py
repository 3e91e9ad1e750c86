"""Describe an image with a Gemma 3 model that has vision (4b, 12b, 27b or a tiny test model).

    python samples/describe_image.py builds/4b photo.jpg
    python samples/describe_image.py --reference --checkpoint path/to/gemma-3-4b-it photo.jpg \\
        --prompt "What is in this picture?" --pan-and-scan

Uses the library API: open_build (or the PyTorch reference), prepare_images, build_prompt_ids,
session.image_features and generate; prints the model's answer.
"""

from __future__ import annotations

import argparse
import sys

from g3export.runtimes.generate import generate
from g3export.runtimes.images import prepare_images
from g3export.runtimes.prompt import build_prompt_ids
from g3export.runtimes.sampling import SamplingConfig


def open_session(args):
    if args.reference:
        from g3export.modeling.weights import build_model
        from g3export.runtimes.reference import TorchSession
        from g3export.runtimes.tokenizer import Tokenizer

        model = build_model(checkpoint=args.checkpoint)
        ctx = min(args.max_context, model.config.text.max_position_embeddings)
        return TorchSession(model, ctx), Tokenizer.from_checkpoint(args.checkpoint)
    from g3export.runtimes.loader import open_build

    return open_build(args.build_dir, provider=args.provider)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("build_dir", nargs="?", help="a g3export build directory (not with --reference)")
    p.add_argument("image", help="PNG, JPEG, WebP, GIF or BMP file")
    p.add_argument("--prompt", default="Describe this image in detail.")
    p.add_argument("--pan-and-scan", action="store_true", help="add crops of a wide or tall image")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--reference", action="store_true", help="run the PyTorch reference")
    p.add_argument("--checkpoint", help="with --reference: a HF Gemma 3 directory")
    p.add_argument("--max-context", type=int, default=4096,
                   help="with --reference: cache length (at most the model's)")
    p.add_argument("--provider", default="cpu", help="cpu or cuda (build directories)")
    args = p.parse_args(argv)
    if args.reference != bool(args.checkpoint) or args.reference == bool(args.build_dir):
        p.error("give BUILD_DIR, or --reference --checkpoint DIR")

    session, tokenizer = open_session(args)
    cfg = session.config
    try:
        pixels, views = prepare_images([args.image], cfg, pan_and_scan=args.pan_and_scan)
        ids = build_prompt_ids(tokenizer, cfg, args.prompt, images=views)
        features = session.image_features(pixels)
        result = generate(session, ids, args.max_new_tokens, SamplingConfig(), image_features=features)
    except ValueError as e:  # ImageError, PromptError, GenerationError: the message says what to do
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tokenizer.decode(result.token_ids).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
