"""Weight sources: where a model's tensors come from, read one tensor or one row block at a time
(DESIGN §3.6 "Weights stream").

A `WeightSource` maps our parameter names (those of `Gemma3Model.state_dict()`) to the shape of
each tensor and reads it in blocks of leading-dimension rows, in order:

    src.tensors()                      {name: SourceTensor(shape, origin)}
    for start, block in src.blocks(name, max_bytes): ...    # block = rows start..start+len
    src.read(name)                     the whole tensor (small tensors; the eager model)

The readers hand out float tensors (float32, or the checkpoint's own bf16/fp16); the consumer
casts. `blocks()` checks every block as it passes (`check_block`): a tensor that is not floating
point, or holds a NaN or an infinity, is a CheckpointError naming it and its file, raised before
its bytes are used. Blocks are sized in float32 bytes (`max_bytes`), so 27B's 2.8 GB embedding
is never whole in memory.

Implementations: `HFSource` (safetensors, opened per block so its memory map never stays
resident), `g3export.modeling.gguf.GGUFSource`, `RandomSource` (seeded per name; the same
values as `weights.random_weights`) and `TensorSource` (tensors already in memory: a
materialised model's state). Why blocks in order instead of random access: the seeded
generator produces a tensor's values sequentially, and safetensors / GGUF rows are contiguous.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import UserError

LM_HEAD = "<lm_head>"  # marker: a tied output head in the checkpoint, checked against the embedding
EMBED = "language_model.embed_tokens.weight"
BLOCK_BYTES = 32 << 20  # default block: 32 MB of float32


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class SourceTensor:
    shape: tuple[int, ...]
    origin: str  # "<file>: <name in the file>", for messages


def few(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    head = ", ".join(names[:n])
    return head if len(names) <= n else f"{head} and {len(names) - n} more ({len(names)} in all)"


def check_block(block: torch.Tensor, origin: str) -> torch.Tensor:
    """Refuse a block that is not floating point or is not finite (the first bad tensor wins)."""
    if not block.is_floating_point():
        raise CheckpointError(f"{origin} is {str(block.dtype).removeprefix('torch.')}, not a "
                              "floating-point weight; the checkpoint is corrupt or not Gemma 3's")
    if not bool(torch.isfinite(block).all()):
        raise CheckpointError(f"{origin} holds NaN or infinite values; the checkpoint is corrupt "
                              "(fetch it again) or was saved from a diverged model")
    return block


def rows_per_block(shape: tuple[int, ...], max_bytes: int) -> int:
    row = 4
    for d in shape[1:]:
        row *= d
    return max(1, max_bytes // max(row, 1))


class WeightSource:
    """Base: subclasses implement `tensors()` and `_blocks()` (module docstring)."""

    label = "weights"

    def tensors(self) -> dict[str, SourceTensor]:
        raise NotImplementedError

    def _blocks(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        raise NotImplementedError

    def blocks(self, name: str, max_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, block) over the leading dimension, in order, each block checked. A 0-D or
        1-D tensor comes as one block."""
        info = self.tensors()[name]
        rows = rows_per_block(info.shape, max_bytes) if len(info.shape) > 1 else max(
            1, info.shape[0] if info.shape else 1)
        for start, block in self._blocks(name, rows):
            yield start, check_block(block, info.origin)

    def read(self, name: str) -> torch.Tensor:
        parts = [b for _, b in self.blocks(name, max_bytes=1 << 62)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# Tensors in memory


class TensorSource(WeightSource):
    """Tensors already in memory (a materialised model's state_dict and buffers)."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "the model"):
        self._t = {k: v for k, v in tensors.items() if not v.is_meta}
        self.label = label

    def tensors(self) -> dict[str, SourceTensor]:
        return {k: SourceTensor(tuple(v.shape), f"{self.label}: {k}") for k, v in self._t.items()}

    def _blocks(self, name, rows):
        t = self._t[name].detach()
        if t.dim() < 2:
            yield 0, t
            return
        for start in range(0, t.shape[0], rows):
            yield start, t[start:start + rows]


# ---------------------------------------------------------------------------------------------
# Seeded random weights


def seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


NORMAL_CHUNK = 1 << 24


def normal_chunks(numel: int, mean: float, std: float, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """N(mean, std) in float32, drawn in chunks of NORMAL_CHUNK elements: the chunking is part of
    the values (a generator draws differently for other sizes), so every consumer uses this."""
    for start in range(0, numel, NORMAL_CHUNK):
        n = min(NORMAL_CHUNK, numel - start)
        yield torch.empty(n, dtype=torch.float32).normal_(mean, std, generator=gen)


def random_init(model: torch.nn.Module) -> dict[str, tuple[float, float] | None]:
    """name -> (mean, std) of its normal distribution, or None for zeros (module docstring of
    weights): N(0, 0.02) for weights, N(0, 0.1) for RMSNorm, 1 + N(0, 0.1) for LayerNorm."""
    from .text import RMSNorm

    out: dict[str, tuple[float, float] | None] = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias":
                out[full] = None
            elif isinstance(module, RMSNorm):
                out[full] = (0.0, 0.1)
            elif isinstance(module, torch.nn.LayerNorm):
                out[full] = (1.0, 0.1)
            else:
                out[full] = (0.0, 0.02)
    return out


class RandomSource(WeightSource):
    """Seeded random values per parameter of `model` (may be on the meta device)."""

    def __init__(self, model: torch.nn.Module, seed: int = 0):
        self.seed = seed
        self.label = f"random weights (seed {seed})"
        self._init = random_init(model)
        self._shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}

    def tensors(self):
        return {k: SourceTensor(s, f"{self.label}: {k}") for k, s in self._shapes.items()}

    def _blocks(self, name, rows):
        shape = self._shapes[name]
        numel = 1
        for d in shape:
            numel *= d
        init = self._init[name]
        row_elems = numel // shape[0] if len(shape) >= 2 else numel
        if init is None:
            if len(shape) < 2:
                yield 0, torch.zeros(shape)
                return
            for start in range(0, shape[0], rows):
                yield start, torch.zeros((min(rows, shape[0] - start), *shape[1:]))
            return
        gen = torch.Generator().manual_seed(seed_for(self.seed, name))
        if len(shape) < 2:
            rows, row_elems, nrows = 1, numel, 1
        else:
            nrows = shape[0]
        # Blocks are filled from the generator's fixed chunks without concatenating lists of
        # them: at most one chunk and one block are alive.
        start, block, filled = 0, None, 0
        for chunk in normal_chunks(numel, *init, gen):
            while chunk.numel():
                if block is None:
                    n = min(rows, nrows - start)
                    block = torch.empty(n * row_elems, dtype=torch.float32)
                take = min(chunk.numel(), block.numel() - filled)
                block[filled:filled + take] = chunk[:take]
                filled += take
                chunk = chunk[take:]
                if filled == block.numel():
                    n = block.numel() // row_elems
                    yield start, block.view((n, *shape[1:]) if len(shape) >= 2 else shape)
                    start, block, filled = start + n, None, 0
            del chunk
        if block is not None:
            raise AssertionError("random stream did not end on a block boundary")


# ---------------------------------------------------------------------------------------------
# Hugging Face safetensors


def hf_name(key: str) -> str | None:
    """Our parameter name for a HF safetensors key, LM_HEAD, or None if it is not Gemma 3's.

    The SigLIP tower appears as `vision_tower.vision_model.X` (Hub checkpoints, transformers 4.x)
    and as `vision_tower.X` (transformers 5.x flattened SiglipVisionModel; 5.23 also writes the
    other prefixes in 4.x form when saving); both become our `vision_tower.vision_model.X`.
    """
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return LM_HEAD
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


def require_regular_file(path: Path, what: str) -> None:
    """Refuse anything but a regular file (a FIFO would block the open forever)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} {path} is not a regular file; point at a checkpoint "
                              "directory of ordinary files")


def _safe_open(file: Path):
    from safetensors import safe_open

    require_regular_file(file, "safetensors file")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError: a bad header or a truncated file
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); the download "
                              "is probably incomplete or corrupt: fetch it again") from None


def hf_files(root: Path) -> list[Path]:
    """The safetensors files of a HF directory: from its shard index (entries must be plain
    files inside `root`: no absolute path, no `..`, no symlink leading out), else *.safetensors."""
    index = root / "model.safetensors.index.json"
    if index.exists():
        require_regular_file(index, "safetensors index")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: weight_map is not a mapping of tensor names to shard "
                                  "file names; the index is corrupt: fetch it again")
        real_root = root.resolve()
        names = sorted(set(weight_map.values()))
        for n in names:
            p = Path(n)
            inside = not p.is_absolute() and ".." not in p.parts and n.strip() != ""
            if inside and (root / p).exists():
                inside = (root / p).resolve().is_relative_to(real_root)
            if not inside:
                raise CheckpointError(f"{index} names shard {n!r}, which is outside the "
                                      f"checkpoint directory {root}; refusing to read it")
        missing = [n for n in names if not (root / n).exists()]
        if missing:
            raise CheckpointError(f"{root} lacks shard(s) listed in its index: {few(missing)}; "
                                  "the download is incomplete")
        files = [root / n for n in names]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        extra = " (pytorch_model.bin is not supported: save with safe_serialization)" if any(
            root.glob("*.bin")) else ""
        raise CheckpointError(f"{root} has config.json but no *.safetensors files{extra}")
    for f in files:
        require_regular_file(f, "safetensors file")
    return files


class HFSource(WeightSource):
    """A HF safetensors directory (DESIGN §3.6 names). Headers are read once; data is read per
    block with a fresh `safe_open` (its memory map is dropped after each block, so the resident
    set does not grow with the checkpoint)."""

    def __init__(self, root: Path):
        self.root = root
        self.label = str(root)
        self._where: dict[str, tuple[Path, str]] = {}
        self._info: dict[str, SourceTensor] = {}
        unknown: list[str] = []
        for file in hf_files(root):
            with _safe_open(file) as f:
                for key in f.keys():
                    ours = hf_name(key)
                    if ours is None:
                        unknown.append(key)
                        continue
                    if ours in self._where:
                        raise CheckpointError(f"{root}: tensor {key} appears twice "
                                              f"(also as {self._where[ours][1]})")
                    shape = tuple(f.get_slice(key).get_shape())
                    self._where[ours] = (file, key)
                    self._info[ours] = SourceTensor(shape, f"{file}: {key}")
        if unknown:
            raise CheckpointError(f"{root} has tensors that are not Gemma 3's: {few(unknown)}")

    def tensors(self):
        return dict(self._info)

    def _blocks(self, name, rows):
        file, key = self._where[name]
        shape = self._info[name].shape
        try:
            if len(shape) < 2:
                with _safe_open(file) as f:
                    yield 0, f.get_tensor(key)
                return
            for start in range(0, shape[0], rows):
                with _safe_open(file) as f:
                    block = f.get_slice(key)[start:start + rows]
                yield start, block
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {key} from {file} ({e}); the file looks truncated "
                                  "or corrupt: fetch it again") from None
