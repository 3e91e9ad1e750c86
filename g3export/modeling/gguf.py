"""A bounded GGUF reader for Gemma 3 files: header, metadata and tensor infos, then tensors
dequantized one row block at a time (DESIGN §3.6).

Why not `gguf.GGUFReader`: it builds a numpy object per metadata element, so opening the real
270M (262144 token strings) took 15-20 s, and it trusts the counts in the file, so a 65-byte file
whose array claims 2^40 elements asks for unbounded memory. Here every count and length is
checked against the bytes left in the file before anything is allocated (a bad file is a
CheckpointError at once), strings are decoded straight from a read-only memory map, numeric
arrays become one `np.frombuffer`, and the map is closed once the header is parsed. Tensor data
is read later, per block, from a `np.memmap` of just that block's bytes, and dequantized with
`gguf.quants.dequantize` (the `gguf` package stays the authority on quantization formats).

Format (little-endian, versions 2 and 3): "GGUF", u32 version, u64 tensor count, u64 metadata
count; metadata = (string key, u32 type, value)*; tensor info = (string name, u32 n_dims,
u64 dims[n_dims] innermost first, u32 ggml type, u64 offset)*; the data section starts at the
next multiple of `general.alignment` (default 32). Strings are u64 length + UTF-8 bytes.

GGUF lists dims innermost first, so the torch shape is the reverse. llama.cpp writes every Gemma
RMSNorm weight as (1 + w); `GGUFSource` subtracts 1 to give HF's zero-centred w.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .sources import CheckpointError, SourceTensor, WeightSource, few, require_regular_file

MAGIC = b"GGUF"
# metadata value types: (struct format, byte size) for scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8
# Arrays of arrays: llama.cpp writes none for Gemma 3; each level costs only 12 bytes, so without a
# cap a 1.2 MB file nests 100k deep and the recursive reader hit a RecursionError (a traceback).
_MAX_NESTING = 8


class _Truncated(Exception):
    pass


def _label(name: str) -> str:
    """A name read from the file, for a message: itself if short and printable, else a short
    repr. A garbage name (misaligned by a corrupt count) put raw bytes and newlines into the
    one-line error."""
    return name if len(name) <= 200 and name.isprintable() else repr(name[:80])


class _Cursor:
    """Reads from a buffer, refusing any read past its end."""

    def __init__(self, buf):
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise _Truncated(f"needs {n} bytes at offset {self.pos}, the file has {self.end}")

    def scalar(self, fmt: str, size: int):
        self.need(size)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self) -> str:
        n = self.scalar("<Q", 8)
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise _Truncated(f"unknown metadata value type {vtype}")
        etype, count = self.scalar("<I", 4), self.scalar("<Q", 8)
        if etype in _SCALARS:
            size = _SCALARS[etype][1]
            self.need(count * size)
            arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
            self.pos += count * size
            return arr
        if etype == _STRING:
            self.need(count * 8)  # every string has at least its length prefix
            return [self.string() for _ in range(count)]
        if etype == _ARRAY:
            if depth >= _MAX_NESTING:  # see _MAX_NESTING
                raise _Truncated(f"metadata arrays nested more than {_MAX_NESTING} deep")
            self.need(count * 12)
            return [self.value(_ARRAY, depth + 1) for _ in range(count)]
        raise _Truncated(f"unknown metadata array element type {etype}")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's info; `data` maps its bytes (as GGUFReader's `data`: the float values in
    torch order for float types, uint8 rows of quantized blocks otherwise)."""

    name: str
    shape: tuple[int, ...]   # torch order (the reverse of GGUF's)
    tensor_type: int         # a gguf.GGMLQuantizationType value
    offset: int              # absolute offset in the file
    nbytes: int
    path: Path

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(self.shape[0], 1) if len(self.shape) > 1 else self.nbytes

    def raw(self, start_row: int = 0, rows: int | None = None) -> np.ndarray:
        """The bytes of rows [start_row, start_row + rows) as the array GGUFReader would give."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        nrows = self.shape[0] if len(self.shape) > 1 else 1
        rows = nrows - start_row if rows is None else rows
        shape = (rows, *self.shape[1:]) if len(self.shape) > 1 else self.shape
        qtype = GGMLQuantizationType(self.tensor_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        mm = np.memmap(self.path, dtype=np.uint8, mode="r",
                       offset=self.offset + start_row * self.row_bytes, shape=(rows * self.row_bytes,))
        if block == 1:  # a plain element type: view it as such
            dt = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32,
                  27: np.int64, 28: np.float64}.get(int(qtype))
            if dt is not None:
                return mm.view(dt).reshape(shape)
        lead, last = (shape[:-1], shape[-1]) if shape else ((), 1)  # a 0-D tensor: one element
        return mm.reshape(*lead, last // block * type_size)

    @property
    def data(self) -> np.ndarray:
        return self.raw()


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]


def _parse(path: Path) -> GGUFFile:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise _Truncated(f"{size} bytes is shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf)
            c.need(4)
            if bytes(buf[:4]) != MAGIC:
                raise _Truncated("no GGUF magic")
            c.pos = 4
            version = c.scalar("<I", 4)
            if version not in (2, 3):
                raise _Truncated(f"GGUF version {version} (this reader knows 2 and 3, "
                                 "little-endian)")
            n_tensors, n_kv = c.scalar("<Q", 8), c.scalar("<Q", 8)
            # each entry needs at least 8 + 4 + 1 (metadata) or 8 + 4 + 4 + 8 (tensor) bytes
            c.need(n_kv * 13 + n_tensors * 24)
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = c.string()
                try:  # name the key: "needs 2^43 bytes at offset 853" alone does not say where
                    metadata[key] = c.value(c.scalar("<I", 4))
                except _Truncated as e:
                    raise _Truncated(f"metadata {_label(key)}: {e}") from None
            infos = []
            for _ in range(n_tensors):
                name = c.string()
                n_dims = c.scalar("<I", 4)
                if n_dims > _MAX_DIMS:
                    raise _Truncated(f"tensor {_label(name)} has {n_dims} dimensions")
                dims = [c.scalar("<Q", 8) for _ in range(n_dims)]
                infos.append((name, dims, c.scalar("<I", 4), c.scalar("<Q", 8)))
            header_end = c.pos
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise _Truncated(f"general.alignment {_show(align)} is not a power of two")
    data_start = -(-header_end // align) * align
    tensors = []
    for name, dims, ttype, rel in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Truncated(f"tensor {_label(name)} has unknown type {ttype}") from None
        shape = tuple(int(d) for d in reversed(dims))
        # An empty dimension makes the tensor 0 bytes, so the size check below passes whatever the
        # other dimensions claim: (2^40, 0) then looped 2^28 row blocks of nothing (a hang).
        # Gemma 3 has no empty tensors; with every dimension >= 1 the size check bounds them all.
        if 0 in shape:
            raise _Truncated(f"tensor {_label(name)} has an empty dimension (shape {shape})")
        numel = int(np.prod(shape, dtype=object)) if shape else 1
        # (a 0-D tensor is one element: with a block type it was 1 // 32 = 0 bytes, then an
        # IndexError in `raw`; now refused as not whole blocks)
        row = shape[-1] if shape else 1
        if row % block:
            raise _Truncated(f"tensor {_label(name)}'s rows ({row}) are not whole {qtype.name} "
                             "blocks")
        nbytes = numel // block * type_size
        start = data_start + rel
        if start + nbytes > size:
            raise _Truncated(f"tensor {_label(name)} ends at byte {start + nbytes}, the file has "
                             f"{size}")
        tensors.append(GGUFTensor(name, shape, ttype, start, nbytes, path))
    return GGUFFile(path, metadata, tuple(tensors))


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a Gemma 3 GGUF file's header (cached per file, size and mtime)."""
    p = Path(path)
    require_regular_file(p, "GGUF file")
    st = p.stat()
    return _cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    try:
        g = _parse(Path(path))
    except (_Truncated, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}); it may be truncated: "
                              "fetch it again") from None
    arch = g.metadata.get("general.architecture")
    if arch != "gemma3":
        raise CheckpointError(f"{path} is a GGUF of architecture {_show(arch)}, not 'gemma3'")
    return g


# ---------------------------------------------------------------------------------------------
# Typed metadata


def _show(v: Any) -> str:
    """A metadata value for an error message, in one short line. numpy's repr of an array wraps
    over several lines (and a 262144-element one is long), which broke the one-line error."""
    if isinstance(v, np.ndarray):
        return f"an array of {v.size} {v.dtype}"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def meta_int(g: GGUFFile, key: str, default: Any = None, positive: bool = False) -> Any:
    v = g.metadata.get(key, default)
    if v is None or v is default:
        return v
    if isinstance(v, (np.integer,)):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise CheckpointError(f"{g.path}: GGUF metadata {key} is {_show(v)}, not an integer; "
                              "the file is corrupt or not a Gemma 3 GGUF")
    if positive and v <= 0:
        raise CheckpointError(f"{g.path}: GGUF metadata {key} is {v}; it must be positive")
    return v


def meta_float(g: GGUFFile, key: str, default: Any = None) -> Any:
    v = g.metadata.get(key, default)
    if v is None or v is default:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise CheckpointError(f"{g.path}: GGUF metadata {key} is {_show(v)}, not a number; "
                              "the file is corrupt or not a Gemma 3 GGUF")
    if not np.isfinite(float(v)):
        raise CheckpointError(f"{g.path}: GGUF metadata {key} is {v}, not a finite number")
    return float(v)


def meta_str(g: GGUFFile, key: str, default: Any = None) -> Any:
    v = g.metadata.get(key, default)
    if v is not None and v is not default and not isinstance(v, str):
        raise CheckpointError(f"{g.path}: GGUF metadata {key} is {_show(v)}, not a string")
    return v


# ---------------------------------------------------------------------------------------------
# Names and the source

_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_name(name: str) -> str | None:
    from .sources import EMBED, LM_HEAD

    if name == "token_embd.weight":
        return EMBED
    if name == "output_norm.weight":
        return "language_model.norm.weight"
    if name == "output.weight":
        return LM_HEAD
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isascii() and parts[1].isdigit() \
            and parts[3] == "weight" \
            and parts[2] in _BLOCK:
        return f"language_model.layers.{int(parts[1])}.{_BLOCK[parts[2]]}.weight"
    return None


class GGUFSource(WeightSource):
    """Gemma 3 text weights of a GGUF file, dequantized per block of rows (quantization blocks
    run along a row, so a row block is whole blocks)."""

    def __init__(self, path: Path):
        self.path = path
        self.label = str(path)
        g = open_gguf(path)
        self._t: dict[str, GGUFTensor] = {}
        unknown = []
        for t in g.tensors:
            ours = gguf_name(t.name)
            if ours is None:
                unknown.append(t.name)
            else:
                self._t[ours] = t
        if unknown:
            raise CheckpointError(f"{path} has tensors that are not Gemma 3 text weights: "
                                  f"{few(map(_label, unknown))}")

    def tensors(self):
        return {k: SourceTensor(t.shape, f"{self.path}: {t.name}") for k, t in self._t.items()}

    def _blocks(self, name, rows):
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self._t[name]
        is_norm = t.name.endswith("norm.weight")
        nrows = t.shape[0] if len(t.shape) > 1 else 1
        for start in range(0, nrows, rows):
            n = min(rows, nrows - start)
            raw = t.raw(start, n)
            if raw.dtype.kind in "iub" and t.tensor_type in (24, 25, 26, 27):
                x = torch.from_numpy(np.array(raw))  # integer tensors: refused by check_block
            else:
                # A type GGML_QUANT_SIZES knows but gguf.quants cannot dequantize (Q8_1, ...)
                # raised NotImplementedError, or AttributeError when given a plain int.
                qtype = GGMLQuantizationType(t.tensor_type)
                try:
                    deq = dequantize(raw, qtype)
                except NotImplementedError:
                    raise CheckpointError(f"{self.path}: tensor {t.name} is {qtype.name}, which "
                                          "the gguf package cannot dequantize") from None
                x = torch.from_numpy(np.array(deq, dtype=np.float32))
                x = x.reshape((n, *t.shape[1:]) if len(t.shape) > 1 else t.shape)
            del raw
            # llama.cpp writes Gemma's RMSNorm weights as 1 + w; ours are zero-centred like HF's.
            yield start, (x - 1.0 if is_norm and x.is_floating_point() else x)


def gguf_config(g: GGUFFile):
    """A text-only ModelConfig from gemma3.* metadata, via HF's config.json keys. What the file
    does not store is llama.cpp's default: local RoPE base 10000, a 6-layer pattern, and an
    attention scale of (hidden / heads) ** -0.5 for the 62-layer 27B, head_dim ** -0.5 otherwise."""
    from .config import ConfigError, config_from_hf

    path = g.path
    required = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count")
    missing = [k for k in required if f"gemma3.{k}" not in g.metadata]
    if missing:
        raise CheckpointError(f"{path} lacks GGUF metadata gemma3.{', gemma3.'.join(missing)}")
    i = functools.partial(meta_int, g, positive=True)
    hidden, heads, layers = i("gemma3.embedding_length"), i("gemma3.attention.head_count"), \
        i("gemma3.block_count")
    head_dim = i("gemma3.attention.key_length", hidden // heads)
    ffn = g.metadata["gemma3.feed_forward_length"]
    if isinstance(ffn, np.ndarray):  # per-layer lengths; Gemma 3 uses one
        if ffn.dtype.kind not in "iu" or len(set(ffn.tolist())) != 1:
            raise CheckpointError(f"{path}: per-layer gemma3.feed_forward_length "
                                  f"{sorted(set(ffn.tolist()))[:5]} is not a Gemma 3 model")
        ffn = int(ffn[0])
    else:
        ffn = i("gemma3.feed_forward_length")
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CheckpointError(f"{path} has no tokenizer.ggml.tokens list; cannot tell the "
                              "vocabulary")
    rope_scaling = None
    scaling_type = meta_str(g, "gemma3.rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise CheckpointError(f"{path}: rope scaling {_show(scaling_type)} is not Gemma 3's "
                                  "(linear)")
        rope_scaling = {"rope_type": "linear",
                        "factor": meta_float(g, "gemma3.rope.scaling.factor", 1.0)}
    eps = meta_float(g, "gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    hf = {
        "model_type": "gemma3_text",
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": i("gemma3.attention.head_count_kv", heads),
        "head_dim": head_dim,
        # llama.cpp (llama-model.cpp, gemma3): 27B scales by (n_embd / n_head)^-0.5.
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        # stored as float32 (9.99999997e-07): round back to the decimal the config had
        "rms_norm_eps": float(f"{eps:.6g}"),
        "rope_theta": meta_float(g, "gemma3.rope.freq_base", 1_000_000.0),
        "rope_local_base_freq": 10_000.0,   # llama.cpp's default, not stored in the file
        "sliding_window_pattern": 6,        # idem
        "rope_scaling": rope_scaling,
        "sliding_window": i("gemma3.attention.sliding_window", 512),
        "max_position_embeddings": i("gemma3.context_length"),
        "bos_token_id": meta_int(g, "tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": meta_int(g, "tokenizer.ggml.eos_token_id", 1),
        "pad_token_id": meta_int(g, "tokenizer.ggml.padding_token_id", 0),
    }
    try:
        return config_from_hf(hf, name=path.stem)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
