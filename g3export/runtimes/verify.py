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
A text graph that takes image features also gets a prefill chunk holding an image block
(text, <start_of_image>, mm_tokens image tokens, <end_of_image>, text; skipped with a note when
the context is too short), fed with the reference's features of random pixels (random features
when the build has no vision component).

Vision (a build with a `vision` component): the graph (OrtVision) and the reference's
image_features on the same random pixel values (`vision_images` images, default 1: the 4b SigLIP
costs ~1 min per image per side on 2 CPU cores). Its difference is taken relative to the
features' scale: max|a - r| / max(1, max|r|) <= tolerance. Vision-only builds are checked without
materialising the text weights (the reference's text part stays on the meta device).

Numbers that are not numbers: any NaN or infinity in the graph's logits, its KV caches (every
dtype; bf16 caches are checked on their bit patterns) or its image features fails the report
(`nonfinite` names where), whatever the differences say: a NaN difference compares false with
every bound, so a max() over differences alone would pass it.
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
    components: list[str] = field(default_factory=list)
    max_vision_diff: float = 0.0       # relative: max|a - r| / max(1, max|r|)
    vision_shape: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)  # where the graph gave NaN/inf

    @property
    def ok(self) -> bool:
        cache_tol = self.tolerance
        return bool(not self.nonfinite
                    and self.max_logit_diff <= self.tolerance and self.max_cache_diff <= cache_tol
                    and np.isfinite(self.max_logit_diff) and np.isfinite(self.max_vision_diff)
                    and self.max_vision_diff <= self.tolerance)

    def format(self) -> str:
        lines = [f"{self.build_dir}: {'OK' if self.ok else 'FAILED'} ({self.dtype}, tolerance "
                 f"{self.tolerance}, weights from {self.weights_from}, components "
                 f"{', '.join(self.components)})"]
        if "text" in self.components:
            lines.append(f"  text: max |logit diff| {self.max_logit_diff:.3g}, max |cache diff| "
                         f"{self.max_cache_diff:.3g}, greedy tokens equal: {self.tokens_equal}")
            for st in self.steps:
                lines.append(f"    {st['kind']:<14} start {st['start']:>5} tokens {st['tokens']:>5}"
                             f"  max diff {st['max_logit_diff']:.3g}")
        if "vision" in self.components:
            lines.append(f"  vision: features {self.vision_shape}, max relative diff "
                         f"{self.max_vision_diff:.3g}")
        lines += [f"  non-finite values (NaN/inf) in: {w}" for w in self.nonfinite]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    @property
    def failed(self) -> bool:
        """True when the CLI should exit non-zero."""
        return not self.ok

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def reference_from_build(build) -> "object":
    """A fp32 Gemma3Model with the weights of the build's graphs (text and/or vision). With no
    text component the model is built on the meta device and only its vision part materialised."""
    import torch
    from torch import nn

    from ..modeling.text import Gemma3Model

    comps = build.components
    if "text" in comps:
        model = Gemma3Model(build.config).eval()
        parts = {"language_model."} | ({"vision_tower.", "multi_modal_projector."}
                                       if "vision" in comps else set())
    else:
        with torch.device("meta"):
            model = Gemma3Model(build.config).eval()
        holder = nn.Module()
        holder.vision_tower, holder.multi_modal_projector = (model.vision_tower,
                                                             model.multi_modal_projector)
        holder.to_empty(device="cpu")
        parts = {"vision_tower.", "multi_modal_projector."}
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name in comps:
        loaded |= _load_initializers(build.path(comps[name].file), params)
    missing = sorted(k for k in params if k.startswith(tuple(parts)) and k not in loaded)
    if missing:
        raise ValueError(f"the build's graphs have no initializer for {missing[:5]}...; pass the "
                         "torch model to verify() instead")
    return model


def _load_initializers(onnx_path, params) -> set[str]:
    import torch

    from ..export.onnx_export import iter_initializers

    loaded = set()
    with torch.no_grad():
        for name, arr in iter_initializers(onnx_path):
            # "a.T+b.T+...": weights the exporter concatenated along their output axis (N)
            names = name.split("+")
            keys = [(p[len("model."):].removesuffix(".T"), p.endswith(".T")) for p in names]
            if not all(p.startswith("model.") and k in params for p, (k, _) in zip(names, keys)):
                continue
            full = torch.from_numpy(np.asarray(arr, dtype=np.float32).copy())
            col = 0
            for key, transposed in keys:
                t = full
                if len(names) > 1:  # [in, N1 + N2 + ...]: this part's columns
                    n = params[key].shape[0]
                    t, col = full[:, col:col + n], col + n
                if transposed:  # W^T [in, out]; the embedding's is [1, hidden, vocab]
                    t = t.reshape(t.shape[-2:]).t()
                if tuple(t.shape) != tuple(params[key].shape):
                    raise ValueError(f"initializer {name} has shape {tuple(t.shape)}, "
                                     f"the model expects {tuple(params[key].shape)} for {key}")
                params[key].copy_(t)
                loaded.add(key)
    return loaded


def verify(build_dir: str | Path, model=None, provider: str = "cpu", seed: int = 0,
           decode_steps: int = 8, progress: bool = False, vision_images: int = 1) -> VerifyReport:
    import torch

    from ..export.manifest import load_build

    b = load_build(build_dir, expect_target="onnx", progress=progress)
    weights_from = "build"
    if model is None:
        model = reference_from_build(b)
    else:
        weights_from = "argument"
        model = model.float().eval()
    comps = b.components
    rep = VerifyReport(str(build_dir), b.dtype, TOLERANCE[b.dtype], weights_from=weights_from,
                       components=list(comps))
    rng = np.random.default_rng(seed)
    cfg = b.config
    pixels = ref_feats = None
    if cfg.has_vision:
        s = cfg.vision.image_size
        pixels = rng.uniform(-1, 1, (vision_images, cfg.vision.num_channels, s, s)).astype(np.float32)
        if "vision" in comps or weights_from == "argument":
            with torch.no_grad():
                ref_feats = model.image_features(torch.from_numpy(pixels)).float().numpy()
    if "vision" in comps:
        from .ort_session import OrtVision

        vio = comps["vision"]
        got = OrtVision(b.path(vio.file), vio, provider)(pixels)
        rep.vision_shape = list(got.shape)
        if not np.isfinite(got).all():
            rep.nonfinite.append("vision image_features")
        if got.shape != ref_feats.shape:
            rep.max_vision_diff = float("inf")
            rep.notes.append(f"vision output shape {list(got.shape)} != reference "
                             f"{list(ref_feats.shape)}")
        else:
            scale = max(1.0, float(np.abs(ref_feats).max()))
            rep.max_vision_diff = float(np.abs(got - ref_feats).max()) / scale
    if "text" in comps:
        _verify_text(b, model, provider, rng, decode_steps, rep, ref_feats)
    return rep


def _verify_text(b, model, provider, rng, decode_steps, rep, feats) -> None:
    from .ort_session import OrtSession
    from .reference import TorchSession

    cfg = b.config
    sess = OrtSession.from_build(b, provider=provider)
    ref = TorchSession(model, b.max_context)
    w = cfg.text.sliding_window
    vocab_text = min(cfg.text.vocab_size, cfg.image_token_id if cfg.has_vision else 1 << 62)
    plan = []
    pos = 0
    for c in (3, w + 3):
        c = min(c, b.max_context - pos - 1)
        if c > 0:
            plan.append(("prefill", c))
            pos += c
    images = bool(b.component("text").options.get("images"))
    if images:
        mm = cfg.mm_tokens_per_image
        n_img = mm + 2 + 4  # 2 text, boi, image, eoi, 2 text
        if pos + n_img + 1 <= b.max_context:
            plan.append(("prefill+image", n_img))
            pos += n_img
        else:
            rep.notes.append(f"image chunk skipped: {n_img} tokens do not fit the context "
                             f"{b.max_context} after {pos}")
        if feats is None:
            feats = rng.normal(0, 1, (1, mm, cfg.text.hidden_size)).astype(np.float32)
    plan += [("decode", 1)] * max(0, min(decode_steps, b.max_context - pos))
    pos = 0
    tok = None
    for kind, n in plan:
        f = None
        if kind == "decode":
            ids = np.array([[tok]], dtype=np.int64)
        else:
            ids = rng.integers(0, vocab_text, (1, n), dtype=np.int64)
            if kind == "prefill+image":
                mm = cfg.mm_tokens_per_image
                ids[0, 2] = cfg.boi_token_id
                ids[0, 3:3 + mm] = cfg.image_token_id
                ids[0, 3 + mm] = cfg.eoi_token_id
                f = feats[0]
        a = sess.forward(ids, pos, f)
        r = ref.forward(ids, pos, f)
        if not np.isfinite(a).all():
            rep.nonfinite.append(f"logits ({kind} at {pos})")
        d = float(np.abs(a.astype(np.float64) - r.astype(np.float64)).max())
        rep.max_logit_diff = d if np.isnan(d) else max(rep.max_logit_diff, d)
        if int(a[0].argmax()) != int(r[0].argmax()):
            rep.tokens_equal = False
        rep.steps.append({"kind": kind, "start": pos, "tokens": n, "max_logit_diff": d})
        tok = int(r[0].argmax())
        pos += n
    names = [n for lc in sess.layout.layers for n in (lc.k_name, lc.v_name)]
    if b.dtype == "bf16" and not sess.cache_arrays:  # on a GPU: ORT has no numpy bf16 copy
        rep.notes.append("bf16 caches on the GPU were not checked for NaN/inf")
        return
    caches = sess.cache_arrays or [ov.numpy() for ov in sess.cache_ortvalues()]
    for name, g in zip(names, caches):
        if not _finite(g, b.dtype):
            rep.nonfinite.append(f"cache {name}")
    if b.dtype != "bf16":
        for g, c in zip(caches, ref.caches):
            d = float(np.abs(np.asarray(g, dtype=np.float32) - c.float().numpy()).max())
            rep.max_cache_diff = d if np.isnan(d) else max(rep.max_cache_diff, d)


def _finite(a: np.ndarray, dtype: str) -> bool:
    """No NaN/inf in a cache buffer; bf16 buffers are uint16 bit patterns (exponent all ones
    = inf or NaN)."""
    if dtype == "bf16":
        return not bool(((np.asarray(a).view(np.uint16) & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(a).all())
