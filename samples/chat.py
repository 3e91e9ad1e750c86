"""Interactive multi-turn chat with any build directory (onnx, trt, trt-rtx).

    python samples/chat.py builds/270m
    python samples/chat.py builds/12b-trt --system "Answer briefly." --temperature 0.7
    printf 'Hi!\nWhat did I just say?\n' | python samples/chat.py builds/270m   # non-interactive

Type a message and press Enter; `/exit` (or end of input) quits, `/reset` starts a new
conversation. Each turn renders the whole conversation with Gemma's chat template
(`<start_of_turn>user ... <end_of_turn>`, the model's earlier answers as `model` turns) and
generates the next answer until `<end_of_turn>`. The whole conversation is prefilled again each
turn (simple and exact; a long chat costs a longer prefill). When the conversation no longer fits
the build's context, the oldest turns are dropped (and a note goes to stderr).

Output: with a terminal, a `you> ` prompt and the streamed answer; with piped input, each answer
on its own line(s) followed by one empty line, nothing else on stdout.
"""

from __future__ import annotations

import argparse
import sys

from g3export.runtimes.generate import GenerationError, generate
from g3export.runtimes.loader import open_build
from g3export.runtimes.sampling import SamplingConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("build_dir", help="a g3export build directory")
    p.add_argument("--system", help="a system instruction (Gemma puts it in the first user turn)")
    p.add_argument("--max-new-tokens", type=int, default=512)
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
    interactive = sys.stdin.isatty()
    turns: list[dict] = []  # alternating user / assistant messages

    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            turns.clear()
            continue
        if not text:
            continue
        turns.append({"role": "user", "content": text})
        while True:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + turns
            ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_bos=False)
            if len(ids) + 1 < session.max_context or len(turns) == 1:
                break
            del turns[:2]  # the oldest user turn and its answer
            print("(dropped the oldest turn: the conversation outgrew the context)",
                  file=sys.stderr)
        stream = tokenizer.stream()
        try:
            result = generate(session, ids, args.max_new_tokens, sampling,
                              on_token=lambda t: print(stream.feed(t), end="", flush=True))
        except GenerationError as e:
            print(f"error: {e}", file=sys.stderr)
            turns.pop()
            continue
        print(stream.flush())
        print()
        turns.append({"role": "assistant", "content": tokenizer.decode(result.token_ids)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
