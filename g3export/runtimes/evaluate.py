"""`g3export eval`: what a build's numerics cost, measured on a text (DESIGN §3.9), the way
llama.cpp's `llama-perplexity --kl-divergence` reports it.

For a token sequence x_0..x_{n-1} (the text with <bos>), position i's next-token distribution
P_i = softmax(logits_i) predicts x_{i+1}:

    perplexity  = exp(mean_i -log P_i(x_{i+1}))                         i = 0..n-2
    KL          = mean_i sum_v R_i(v) (log R_i(v) - log P_i(v))          R: the reference's P
    top-1       = fraction of i with argmax logits_i == argmax reference logits_i
    max |dlogit| = max_i,v |logits_i(v) - reference logits_i(v)|

How the logits are obtained: teacher forced, ONE TOKEN PER STEP through `Session.forward` (the
interface every runtime has: ONNX Runtime, TensorRT, the PyTorch reference), the build and the
reference in lockstep, so nothing but two [V] rows is held per step and the text runs straight
on past the sliding window through the real ring cache. Why not chunked prefill with all-position
logits: `Session.forward` returns the last position only, builds are exported with last-position
logits by default (`--all-logits` is a separate export), and a 2,000-token text at 262144 vocab
would be 2 GB of logits per chunk set; decode steps are exact and measure the decode path users
run, at the cost of time (~the build's decode speed; `max_tokens` bounds it). The prefill path's
numerics (MatMulNBits with M > 1 uses another kernel) are therefore not what this measures.

The text is cut to the build's max_context (and to max_tokens), which the report says.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .session import Session


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class EvalResult:
    tokens: int                      # tokens evaluated (predictions = tokens - 1)
    perplexity: float
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    kl_stderr: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None
    truncated_from: int | None = None  # the text's token count when it was cut

    def to_dict(self) -> dict:
        return asdict(self)


class _Stats:
    """Running per-position statistics (one row of logits at a time)."""

    def __init__(self):
        self.nll, self.ref_nll, self.kl, self.same, self.maxdiff = [], [], [], [], 0.0

    def add(self, logits: np.ndarray, target: int, ref: np.ndarray | None) -> None:
        lp = log_softmax(logits)
        self.nll.append(-lp[target])
        if ref is None:
            return
        lr = log_softmax(ref)
        self.ref_nll.append(-lr[target])
        self.kl.append(float(np.sum(np.exp(lr) * (lr - lp))))
        self.same.append(int(np.argmax(logits)) == int(np.argmax(ref)))
        self.maxdiff = max(self.maxdiff, float(np.abs(logits.astype(np.float64) - ref).max()))

    def result(self, tokens: int, truncated_from: int | None) -> EvalResult:
        r = EvalResult(tokens, float(np.exp(np.mean(self.nll))), truncated_from=truncated_from)
        if self.kl:
            kl = np.asarray(self.kl)
            r.reference_perplexity = float(np.exp(np.mean(self.ref_nll)))
            r.kl_mean = float(kl.mean())
            r.kl_stderr = float(kl.std(ddof=1) / np.sqrt(len(kl))) if len(kl) > 1 else 0.0
            r.kl_p99 = float(np.percentile(kl, 99))
            r.kl_max = float(kl.max())
            r.top1_agreement = float(np.mean(self.same))
            r.max_abs_logit_diff = self.maxdiff
        return r


def evaluate(session: Session, ids, reference: Session | None = None,
             max_tokens: int | None = None, progress: bool = False) -> EvalResult:
    """Teacher-forced statistics of `session` on `ids` (module docstring), against `reference`
    when given. Both sessions are reset first and stepped one token at a time."""
    from tqdm import tqdm

    ids = [int(t) for t in ids]
    limit = min(session.max_context, *( [reference.max_context] if reference else []),
                max_tokens or len(ids))
    cut = len(ids) if len(ids) > limit else None
    ids = ids[:limit]
    if len(ids) < 2:
        raise ValueError("eval needs at least 2 tokens")
    session.reset()
    if reference is not None:
        reference.reset()
    stats = _Stats()
    for i in tqdm(range(len(ids) - 1), desc="eval", disable=not progress, leave=False):
        x = np.array([[ids[i]]], dtype=np.int64)
        logits = session.forward(x, i)[0]
        ref = reference.forward(x, i)[0] if reference is not None else None
        stats.add(logits, ids[i + 1], ref)
    return stats.result(len(ids), cut)


def format_table(r: EvalResult, name: str, reference: str | None) -> str:
    """One table, llama-perplexity --kl-divergence style."""
    rows = [("build", name), ("tokens", f"{r.tokens}" + (f" (text cut from {r.truncated_from})"
                                                         if r.truncated_from else "")),
            ("perplexity", f"{r.perplexity:.4f}")]
    if r.kl_mean is not None:
        rows += [("reference", reference or ""),
                 ("reference perplexity", f"{r.reference_perplexity:.4f}"),
                 ("ln(PPL / PPL ref)", f"{np.log(r.perplexity / r.reference_perplexity):+.5f}"),
                 ("mean KL divergence", f"{r.kl_mean:.6f} ± {r.kl_stderr:.6f}"),
                 ("99th pct KL", f"{r.kl_p99:.6f}"),
                 ("max KL", f"{r.kl_max:.6f}"),
                 ("same top-1", f"{100 * r.top1_agreement:.2f} %"),
                 ("max |logit diff|", f"{r.max_abs_logit_diff:.4f}")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
