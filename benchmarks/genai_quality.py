"""What quantization costs, g3export's builds and ONNX Runtime GenAI's, on the same text (issue 14).

`g3export eval`'s statistics (g3export.runtimes.evaluate: perplexity, mean KL of the next-token
distributions against a reference, same top-1, max |logit difference|) for any mix of g3export
builds and GenAI model folders, all stepped in lockstep over the same token ids: the text (the
shipped public-domain one by default) tokenized by the first g3export build's tokenizer, exactly
as `g3export eval` does it, cut to --max-tokens.

How GenAI's logits are obtained: teacher forced, one token per step, through GenAI's own runtime
(onnxruntime-genai 0.18: `Generator.append_tokens([[token]])` runs the model on that one token
with GenAI's KV cache, `Generator.get_logits()` returns that position's [vocab] logits). This is
what `g3export eval` does to a g3export build (one `Session.forward` per token), so both are
measured on their decode paths, and it works on the `prune_lm_head=true` folders the speed
comparison times: with one token per step the last position is the only position. (Running
GenAI's ONNX graph directly with onnxruntime does not work for its sliding layers: their
GroupQueryAttention has `sliding_window_cache=1`, a ring of window capacity that only GenAI's
runtime knows how to feed; its runtime is the faithful way to run GenAI.)

    python benchmarks/genai_quality.py --reference builds/270m-fp32 \
        --ours builds/270m-int4 --ours builds/270m-int4-sym \
        --genai /work/bench_art/genai270m-int4 --genai-reference /work/bench_art/genai270m \
        --max-tokens 600 --threads 2 --json benchmarks/results/genai_quality_270m.json

Every session is compared with --reference (g3export's fp32 build); the GenAI folders also with
--genai-reference (GenAI's own fp32 build, whose weights and graph the int4 one was made from),
and --genai-reference itself with --reference (how far apart the two fp32 implementations are:
GenAI bakes the embedding scale as 25.3, g3export as the bf16-rounded 25.25).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


class GenAISession:
    """The slice of g3export's Session interface that evaluate() uses, over GenAI's runtime."""

    def __init__(self, folder: Path, threads: int, max_context: int = 2048):
        import onnxruntime_genai as og

        self.og, self.name, self.max_context = og, str(folder), max_context
        config = og.Config(str(folder))
        config.clear_providers()  # CPU
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.gen, self.pos = None, 0

    def reset(self) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_context, min_length=self.max_context,
                                  do_sample=False, batch_size=1)
        self.gen, self.pos = self.og.Generator(self.model, params), 0

    def forward(self, input_ids: np.ndarray, start_pos: int) -> np.ndarray:
        if self.gen is None or start_pos != self.pos:
            raise ValueError(f"GenAISession steps in order: expected position {self.pos}")
        self.gen.append_tokens(np.asarray(input_ids, dtype=np.int32))
        self.pos += input_ids.shape[1]
        return np.asarray(self.gen.get_logits())[:, -1]  # [1, vocab]


def main(argv=None) -> int:
    from g3export.export.quantize import default_text
    from g3export.runtimes.evaluate import _Stats
    from g3export.runtimes.ort_session import OrtSession
    from g3export.runtimes.tokenizer import Tokenizer
    from g3export.export.manifest import load_build

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="g3export fp32 build (the reference)")
    ap.add_argument("--ours", action="append", default=[], help="g3export build (repeatable)")
    ap.add_argument("--genai", action="append", default=[], help="GenAI model folder (repeatable)")
    ap.add_argument("--genai-reference", default=None, help="GenAI's fp32 folder")
    ap.add_argument("--text", default=None, help="UTF-8 text (default: the shipped one)")
    ap.add_argument("--max-tokens", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    text_path = Path(args.text) if args.text else default_text()
    ref_build = load_build(args.reference)
    tok = Tokenizer.from_json_file(ref_build.tokenizer)
    ids = tok.encode(Path(text_path).read_text(encoding="utf-8"))
    n_text = len(ids)
    ids = [int(t) for t in ids[:args.max_tokens]]

    def ours(path):
        return OrtSession.from_build(path, provider="cpu", threads=args.threads)

    sessions = {"ref": ours(args.reference)}
    for p in args.ours:
        sessions[p] = ours(p)
    for p in args.genai:
        sessions[p] = GenAISession(Path(p), args.threads)
    if args.genai_reference:
        sessions[args.genai_reference] = GenAISession(Path(args.genai_reference), args.threads)
    limit = min(s.max_context for s in sessions.values())
    if len(ids) > limit:
        ids = ids[:limit]
    pairs = [(name, "ref") for name in sessions if name != "ref"]
    if args.genai_reference:
        pairs += [(g, args.genai_reference) for g in args.genai]
    stats = {pair: _Stats() for pair in pairs}
    for s in sessions.values():
        s.reset()
    t0 = time.perf_counter()
    for i in range(len(ids) - 1):
        x = np.array([[ids[i]]], dtype=np.int64)
        logits = {name: s.forward(x, i)[0] for name, s in sessions.items()}
        for (a, b), st in stats.items():
            st.add(logits[a], ids[i + 1], logits[b])
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(ids) - 1} positions, {time.perf_counter() - t0:.0f}s",
                  flush=True)
    names = {"ref": str(args.reference)}
    rows = []
    for (a, b), st in stats.items():
        r = st.result(len(ids), n_text if n_text > len(ids) else None)
        rows.append({"build": names.get(a, a), "reference": names.get(b, b), **r.to_dict()})
    print(f"\n{len(ids)} tokens of {text_path} ({n_text} in all)")
    print(f"{'build':42s} {'reference':34s} {'ppl':>8s} {'ref ppl':>8s} {'mean KL':>16s} "
          f"{'top-1':>7s} {'max|dlogit|':>11s}")
    for r in rows:
        print(f"{r['build']:42s} {r['reference']:34s} {r['perplexity']:8.3f} "
              f"{r['reference_perplexity']:8.3f} {r['kl_mean']:8.4f} ± {r['kl_stderr']:.4f} "
              f"{100 * r['top1_agreement']:6.1f}% {r['max_abs_logit_diff']:11.2f}")
    out = {"text": str(text_path), "tokens": len(ids), "threads": args.threads, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
