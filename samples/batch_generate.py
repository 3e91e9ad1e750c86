"""Generate for a file of prompts, one per line, into JSON Lines, with any build directory.

    python samples/batch_generate.py builds/270m prompts.txt -o answers.jsonl
    python samples/batch_generate.py builds/12b-trt prompts.txt --max-new-tokens 128 > answers.jsonl

Each non-empty input line is one prompt (chat template applied); each output line is
{"line": N, "prompt": ..., "text": ..., "token_ids": [...], "stop_reason": ..., "seconds": ...}.
The prompts run one after another on one session (its KV cache is allocated once and reset
between prompts). A prompt that fails (e.g. too long for the build's context) gets an
{"line": N, "prompt": ..., "error": ...} line and the batch goes on; the exit status is 1 if any
failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from g3export.runtimes.generate import generate
from g3export.runtimes.loader import open_build
from g3export.runtimes.prompt import build_prompt_ids
from g3export.runtimes.sampling import SamplingConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("build_dir", help="a g3export build directory")
    p.add_argument("prompts", help="text file, one prompt per line ('-' = stdin)")
    p.add_argument("-o", "--output", help="JSONL file to write (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="sample (default: greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provider", default="cpu", help="cpu or cuda (ONNX builds)")
    args = p.parse_args(argv)

    try:
        session, tokenizer = open_build(args.build_dir, provider=args.provider)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"error: {args.build_dir} has no tokenizer.json", file=sys.stderr)
        return 2
    sampling = (SamplingConfig(greedy=True) if args.temperature is None else
                SamplingConfig(greedy=False, temperature=args.temperature, seed=args.seed))
    src = sys.stdin if args.prompts == "-" else open(args.prompts, encoding="utf-8")
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    failed = 0
    with src, out if args.output else _nothing():
        for n, line in enumerate(src, 1):
            prompt = line.rstrip("\n")
            if not prompt.strip():
                continue
            t0 = time.perf_counter()
            try:
                ids = build_prompt_ids(tokenizer, session.config, prompt)
                r = generate(session, ids, args.max_new_tokens, sampling)
                rec = {"line": n, "prompt": prompt, "text": tokenizer.decode(r.token_ids).strip(),
                       "token_ids": r.token_ids, "stop_reason": r.stop_reason,
                       "seconds": round(time.perf_counter() - t0, 3)}
            except ValueError as e:  # GenerationError, PromptError: report and go on
                failed += 1
                rec = {"line": n, "prompt": prompt, "error": str(e)}
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
    return 1 if failed else 0


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
