"""`g3export verify BUILD_DIR`: run the built graph (OrtSession, in-place cache) and the PyTorch
reference (TorchSession over Gemma3Model) on the same random tokens and report the largest
differences of logits and of the KV caches.

The reference weights are read back from the build's own ONNX initializers (names are the
module's parameter names under the export wrapper's `model.` prefix; `<name>.T` initializers are
stored transposed and transposed back), so verify needs nothing but the build directory and checks
exactly the weights that were shipped. A torch model can be passed instead (tests do). The
reference always runs in fp32; fp16/bf16 builds are compared against it with a looser tolerance.

The schedule covers every path: a short prefill chunk (3 tokens), a chunk longer than the sliding
window that wraps the ring (W + 3 tokens, clipped to the context), then greedy decode steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

TOLERANCE = {"fp32": 2e-3, "fp16": 0.15, "bf16": 0.6}  # max |logit difference|


@dataclass
class VerifyReport:
    build_dir: str
    dtype: str
    tolerance: float
    max_logit_diff: float = 0.0
    max_cache_diff: float = 0.0
    steps: list[dict] = field(default_factory=list)
    tokens_equal: bool = True
    weights_from: str = "build"

    @property
    def ok(self) -> bool:
        cache_tol = self.tolerance
        return bool(self.max_logit_diff <= self.tolerance and self.max_cache_diff <= cache_tol
                    and np.isfinite(self.max_logit_diff))

    @property
    def failed(self) -> bool:
        """True when the CLI should exit non-zero."""
        return not self.ok

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def reference_from_build(build) -> "object":
    """A fp32 Gemma3Model with the weights of the build's text graph."""
    import torch

    from ..modeling.text import Gemma3Model
    from .onnx_export import iter_initializers

    model = Gemma3Model(build.config).eval()
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for name, arr in iter_initializers(build.path(build.component("text").file)):
            if not name.startswith("model."):
                continue
            key, transposed = name[len("model."):], False
            if key.endswith(".T"):
                key, transposed = key[:-2], True
            if key not in params:
                continue
            t = torch.from_numpy(np.asarray(arr, dtype=np.float32).copy())
            if transposed:
                t = t.t()
            if tuple(t.shape) != tuple(params[key].shape):
                raise ValueError(f"initializer {name} has shape {tuple(t.shape)}, "
                                 f"the model expects {tuple(params[key].shape)}")
            params[key].copy_(t)
            loaded.add(key)
    text_params = {k for k in params if k.startswith("language_model.")}
    missing = sorted(text_params - loaded)
    if missing:
        raise ValueError(f"the build's graph has no initializer for {missing[:5]}...; pass the "
                         "torch model to verify() instead")
    return model


def verify(build_dir: str | Path, model=None, provider: str = "cpu", seed: int = 0,
           decode_steps: int = 8, progress: bool = False) -> VerifyReport:
    from ..runtimes.ort_session import OrtSession
    from ..runtimes.reference import TorchSession
    from .build import load_build

    b = load_build(build_dir, expect_target="onnx", progress=progress)
    weights_from = "build"
    if model is None:
        model = reference_from_build(b)
    else:
        weights_from = "argument"
        model = model.float().eval()
    cfg = b.config
    sess = OrtSession.from_build(build_dir, provider=provider)
    ref = TorchSession(model, b.max_context)
    rep = VerifyReport(str(build_dir), b.dtype, TOLERANCE[b.dtype], weights_from=weights_from)

    rng = np.random.default_rng(seed)
    w = cfg.text.sliding_window
    chunks = [3, w + 3]
    pos = 0
    tok = None
    plan = []
    for c in chunks:
        c = min(c, b.max_context - pos - 1)
        if c > 0:
            plan.append(("prefill", c))
            pos += c
    plan += [("decode", 1)] * max(0, min(decode_steps, b.max_context - pos))
    pos = 0
    for kind, n in plan:
        if kind == "prefill":
            ids = rng.integers(0, cfg.text.vocab_size, (1, n), dtype=np.int64)
        else:
            ids = np.array([[tok]], dtype=np.int64)
        a = sess.forward(ids, pos)
        r = ref.forward(ids, pos)
        d = float(np.abs(a.astype(np.float64) - r.astype(np.float64)).max())
        rep.max_logit_diff = max(rep.max_logit_diff, d)
        if int(a[0].argmax()) != int(r[0].argmax()):
            rep.tokens_equal = False
        rep.steps.append({"kind": kind, "start": pos, "tokens": n, "max_logit_diff": d})
        tok = int(r[0].argmax())
        pos += n
    if b.dtype != "bf16":
        got = [np.asarray(ov.numpy(), dtype=np.float32) for ov in sess.cache_ortvalues()]
        for g, c in zip(got, ref.caches):
            rep.max_cache_diff = max(rep.max_cache_diff, float(np.abs(g - c.float().numpy()).max()))
    return rep
