"""One-shot generation from any build directory (onnx, trt, trt-rtx).

    python samples/generate.py builds/270m --prompt "Write a haiku about the sea."
    python samples/generate.py builds/12b-trt --prompt "..." --temperature 0.8 --top-p 0.95 --seed 1
    python samples/generate.py builds/270m --prompt "..." --json     # one JSON object

Uses the library API only: open_build (picks ONNX Runtime or TensorRT from the manifest),
build_prompt_ids (Gemma's chat template), generate (chunked prefill, decode, sampling, stop at
<end_of_turn>/<eos>). The answer streams to stdout as it is generated (not with --json).
"""

from __future__ import annotations

import argparse
import json
import sys

from g3export.runtimes.generate import generate
from g3export.runtimes.loader import open_build
from g3export.runtimes.prompt import build_prompt_ids
from g3export.runtimes.sampling import SamplingConfig


def sampling_from(args) -> SamplingConfig:
    if args.temperature is None and args.top_k is None and args.top_p is None:
        return SamplingConfig(greedy=True)
    return SamplingConfig(greedy=False, temperature=args.temperature or 1.0, top_k=args.top_k or 0,
                          top_p=args.top_p or 1.0, seed=args.seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("build_dir", help="a g3export build directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as raw text")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--provider", default="cpu", help="cpu or cuda (ONNX builds)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)

    try:
        session, tokenizer = open_build(args.build_dir, provider=args.provider)
        if tokenizer is None:
            raise ValueError(f"{args.build_dir} has no tokenizer.json; rebuild it from a "
                             "checkpoint that has one")
        ids = build_prompt_ids(tokenizer, session.config, args.prompt,
                               chat_template=not args.no_chat_template)
        stream = tokenizer.stream()

        def on_token(tok: int) -> None:
            if not args.json:
                print(stream.feed(tok), end="", flush=True)

        result = generate(session, ids, args.max_new_tokens, sampling_from(args),
                          on_token=on_token)
    except (ValueError, RuntimeError) as e:  # BuildError, GenerationError, PromptError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"prompt_token_ids": result.prompt_token_ids,
                          "token_ids": result.token_ids,
                          "text": tokenizer.decode(result.token_ids),
                          "stop_reason": result.stop_reason,
                          "decode_tokens_per_s": result.decode_tokens_per_s}))
    else:
        print(stream.flush())
    return 0


if __name__ == "__main__":
    sys.exit(main())
