"""Static activation scales for `--quant fp8` (DESIGN §3.9 "FP8"): the absmax of every decoder
linear layer's input over a calibration text, computed by the PyTorch reference decoder layer
(g3export.modeling.text.DecoderLayer) in float32.

Layer by layer, streaming the weights: the model may be far larger than memory (the export
streams it, DESIGN §3.6), so calibration never materialises it. The text's tokens go through the
embedding (only the rows of the tokens that occur, read block by block from the source), then
through one decoder layer at a time: the layer is built on the meta device, its weights read
from the source in float32, run over the whole token sequence as one chunk (start 0, empty
caches: the attention op takes any chunk length), its linear layers' inputs measured by forward
pre-hooks, and dropped before the next layer is read. Peak memory is one decoder layer in
float32 (12B: ~0.9 GB; 27B: ~1.6 GB) plus [tokens, hidden] activations, not the model; the
result equals running the whole model on the text as one chunk (the causal model's layer i
outputs depend only on layer i-1's), which is what the test checks against.

The text is cut to `max_tokens` (default CALIBRATION_TOKENS, at most the build's max_context:
the positions the build will see). Without a tokenizer (random-weight presets), the text's
UTF-8 bytes (mod the vocabulary) are the token ids after BOS, and the manifest says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

CALIBRATION_TOKENS = 512
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def calibration_ids(text: str, tokenizer, cfg, max_tokens: int) -> tuple[list[int], str]:
    """The calibration token ids and how they were made ("tokenizer" or "utf-8 bytes")."""
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            from ..runtimes.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_json_file(tokenizer)
        ids, how = tokenizer.encode(text), "tokenizer"
    else:
        ids = [cfg.text.bos_token_id] + [b % cfg.text.vocab_size for b in text.encode("utf-8")]
        how = "utf-8 bytes mod vocab_size (no tokenizer)"
    return ids[:max_tokens], how


def _prefix(model) -> str:
    names = dict(model.named_parameters())
    return next(n for n in names if n.endswith("embed_tokens.weight")).removesuffix(
        "embed_tokens.weight")


def _embed(source, name: str, ids: torch.Tensor, hidden: int, scale: float) -> torch.Tensor:
    """ScaledEmbedding of `ids` from the source's row blocks (only the rows that occur)."""
    x = torch.zeros(len(ids), hidden, dtype=torch.float32)
    for start, block in source.blocks(name):
        sel = (ids >= start) & (ids < start + block.shape[0])
        x[sel] = block[ids[sel] - start].to(torch.float32)
    return x * scale


@torch.inference_mode()
def linear_input_amax(model, source, ids: list[int]) -> dict[str, float]:
    """{module name (e.g. "language_model.layers.3.mlp.down_proj"): max |input|} for every
    decoder linear layer of `model` (a Gemma3Model, meta or materialised) over `ids`, one chunk.
    source: the WeightSource its parameters stream from (None: the model's own tensors)."""
    from ..modeling.cache import kv_layout
    from ..modeling.sources import TensorSource
    from ..modeling.text import DecoderLayer, RotaryEmbedding

    if source is None:
        source = TensorSource(dict(model.named_parameters()))
    cfg = model.config.text
    pre = _prefix(model)
    t = len(ids)
    x = _embed(source, pre + "embed_tokens.weight", torch.tensor(ids, dtype=torch.int64),
               cfg.hidden_size, cfg.embed_scale)[None]
    rope = RotaryEmbedding(cfg)(torch.arange(t, dtype=torch.int64)[None], torch.float32)
    start = torch.zeros(1, dtype=torch.int64)
    groups = torch.full((1, t), -1, dtype=torch.int64)
    layout = kv_layout(cfg, t, 1, "fp32")
    amax: dict[str, float] = {}
    for i in range(cfg.num_hidden_layers):
        with torch.device("meta"):
            layer = DecoderLayer(cfg, i)
        lp = f"{pre}layers.{i}."
        layer.load_state_dict({k: source.read(lp + k).to(torch.float32)
                               for k in layer.state_dict()}, assign=True)
        hooks = []
        for name in LINEARS:
            def hook(mod, args, key=lp + name):
                amax[key] = max(amax.get(key, 0.0), float(args[0].abs().max()))
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(hook))
        shape = layout.layers[i].shape
        caches = [torch.zeros(shape, dtype=torch.float32) for _ in "kv"]
        cos, sin = rope[layer.layer_type]
        x, _, _ = layer(x, cos, sin, *caches, start, groups)
        for h in hooks:
            h.remove()
        del layer, caches
    return amax


def calibrate(model, source, calibration: dict, tokenizer, max_context: int,
              max_tokens: int = CALIBRATION_TOKENS) -> tuple[dict[str, float], dict]:
    """(linear_input_amax over the calibration text, the manifest's calibration record:
    `calibration` (quantize.read_calibration's {name, path, sha256, chars}) plus tokens and
    how they were made)."""
    text = Path(calibration["path"]).read_text(encoding="utf-8")
    ids, how = calibration_ids(text, tokenizer, model.config, min(max_tokens, max_context))
    return linear_input_amax(model, source, ids), {**calibration, "tokens": len(ids),
                                                   "token_ids": how}
