"""Initializers as recipes, streamed into the external-data file (DESIGN §3.6 "Weights stream").

An exported graph's weights are placeholders: the model was traced on the meta device. Each
initializer gets a `Recipe`: the source tensor(s) (a `g3export.modeling.sources.WeightSource`
and a name), the layout change the graph passes made (a transpose for `_fold_weight_transposes`,
a concatenation along N for `_fuse_sibling_matmuls`, the tied embedding's [1, hidden, vocab]
reshape for `_tie_lm_head`) and the dtype to store. A `StreamTensor` is an `ir.LazyTensor` that
carries its recipe, so the passes compose recipes on onnx_ir and nothing is read until written.

`save_with_external_data` writes each initializer into `<file>.data`:
* a plain recipe, one source row block at a time (bounded by `block_bytes` of float32);
* a transposed or concatenated recipe of at most `block_bytes`, whole;
* a larger one (27B's 2.8 GB embedding, stored transposed), by source row blocks: a block of
  source rows is a block of output *columns*, written with one `pwrite` per output row at its
  strided offset. Nothing of it is in memory beyond one block; `pwrite` goes through the page
  cache, which (unlike a writable memory map) does not count in the process's resident set.
The file is hashed (sha256) as it is written: sequential bytes on the way out, a strided region
read back once it is complete (from the page cache). The digest is returned with the file's
size and mtime, so the build manifest need not read the file again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch

from ..modeling.sources import BLOCK_BYTES, WeightSource

_IR_DTYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
              torch.bfloat16: ir.DataType.BFLOAT16}


@dataclass(frozen=True)
class Part:
    source: WeightSource
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Recipe:
    """output = reshape(concat([p.T for p in parts], axis=1) if transposed else parts[0],
    shape), cast to dtype."""

    parts: tuple[Part, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]
    transposed: bool = False

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def transpose(self) -> "Recipe":
        (p,) = self.parts
        if self.transposed or len(p.shape) != 2:
            raise ValueError("only a plain 2-D weight is transposed")
        return Recipe(self.parts, self.dtype, (p.shape[1], p.shape[0]), True)

    def reshape(self, shape: tuple[int, ...]) -> "Recipe":
        if int(np.prod(shape, dtype=np.int64)) != self.numel:
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return Recipe(self.parts, self.dtype, tuple(shape), self.transposed)

    @staticmethod
    def concat_columns(recipes: list["Recipe"]) -> "Recipe":
        """Transposed 2-D recipes side by side (the fused q/k/v, gate/up weights)."""
        if not all(r.transposed and len(r.shape) == 2 for r in recipes) or \
                len({(r.shape[0], r.dtype) for r in recipes}) != 1:
            raise ValueError("concat_columns takes transposed 2-D recipes of one height and dtype")
        parts = tuple(p for r in recipes for p in r.parts)
        return Recipe(parts, recipes[0].dtype,
                      (recipes[0].shape[0], sum(r.shape[1] for r in recipes)), True)

    def materialize(self) -> torch.Tensor:
        """The whole tensor (small recipes, and the eager fallback of StreamTensor.numpy())."""
        if self.transposed:
            x = torch.cat([p.source.read(p.name).to(self.dtype).t() for p in self.parts], dim=1)
        else:
            x = self.parts[0].source.read(self.parts[0].name).to(self.dtype)
        return x.reshape(self.shape).contiguous()


class StreamTensor(ir.LazyTensor):
    """An initializer value that is a recipe; read only when written (or asked for).

    alias_of: the name of another initializer whose bytes this one IS, in another shape (the
    lm_head's 2-D view of the tied embedding, g3export.export.onnx_lm_head): the writer points
    both at the same range of the .data file and writes the bytes once."""

    def __init__(self, recipe: Recipe, name: str, alias_of: str | None = None):
        super().__init__(lambda: ir.tensor(recipe.materialize(), name=name),
                         dtype=_IR_DTYPES[recipe.dtype], shape=ir.Shape(recipe.shape), name=name)
        self.recipe = recipe
        self.alias_of = alias_of


def stream_tensor(value: ir.Value) -> StreamTensor | None:
    cv = value.const_value
    return cv if isinstance(cv, StreamTensor) else None


def attach_recipes(m: ir.Model, lookup: Callable[[str], tuple[WeightSource, str] | None]) -> None:
    """Give every initializer that holds a torch tensor (a meta placeholder or a real weight) a
    plain recipe from `lookup(initializer name)`. A placeholder without a source is an error."""
    for name, v in m.graph.initializers.items():
        raw = getattr(v.const_value, "raw", None)
        if not isinstance(raw, torch.Tensor):
            continue
        found = lookup(name)
        if found is None:
            if raw.is_meta:
                raise RuntimeError(f"initializer {name} is a placeholder with no weight source")
            continue
        source, key = found
        shape = tuple(raw.shape)
        got = source.tensors()[key].shape
        if tuple(got) != shape:
            raise RuntimeError(f"{source.label}: {key} has shape {list(got)}, the graph needs "
                               f"{list(shape)}")
        v.const_value = StreamTensor(Recipe((Part(source, key, shape),), raw.dtype, shape), name)


# ---------------------------------------------------------------------------------------------
# Writing


class _HashedFile:
    """A file written at increasing offsets (or strided within a reserved region), hashed in
    file order: bytes written at the hashed frontier are hashed at once, the rest read back by
    `catch_up()`."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0
        self.hashed = 0
        self.sha = hashlib.sha256()

    def pwrite(self, data, offset: int) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            n = os.pwrite(self.fd, mv, offset)
            mv, offset = mv[n:], offset + n

    def write(self, data) -> None:
        self.pwrite(data, self.pos)
        n = memoryview(data).nbytes
        if self.hashed == self.pos:
            self.sha.update(data)
            self.hashed += n
        self.pos += n

    def align(self, align: int) -> None:
        pad = (-self.pos) % align
        if pad:
            self.write(b"\0" * pad)

    def catch_up(self, chunk: int = 1 << 24) -> None:
        while self.hashed < self.pos:
            b = os.pread(self.fd, min(chunk, self.pos - self.hashed), self.hashed)
            if not b:
                raise OSError(f"{self.path} is shorter than written")
            self.sha.update(b)
            self.hashed += len(b)

    def close(self) -> dict:
        self.catch_up()
        os.fsync(self.fd)
        os.close(self.fd)
        st = self.path.stat()
        return {"size": st.st_size, "sha256": self.sha.hexdigest(), "mtime_ns": st.st_mtime_ns}


def _fixed_mmap_threshold(threshold: int = 1 << 20) -> None:
    """Have glibc serve every allocation over 1 MB with its own mmap, returned to the system on
    free. Streaming allocates and frees a few blocks of up to 64 MB per tensor; glibc's default
    *dynamic* threshold rises to 32 MB after the first such free, after which blocks come from
    the heap and its fragmentation kept ~150 MB more resident (measured on the test of
    tests/export/test_stream.py: peak growth 294 -> 160 MB). No-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def write_recipe(f: _HashedFile, r: Recipe, block_bytes: int, bar) -> None:
    """Append `r`'s bytes at f.pos (module docstring)."""
    if not r.transposed:
        p = r.parts[0]
        for _, block in p.source.blocks(p.name, block_bytes):
            data = _bytes(block.to(r.dtype))
            f.write(data)
            bar.update(data.nbytes)
        return
    if r.numel * 4 <= block_bytes:
        f.write(_bytes(r.materialize()))
        bar.update(r.nbytes)
        return
    rows = r.parts[0].shape[1]  # the 2-D transposed layout (before any reshape)
    cols = sum(p.shape[0] for p in r.parts)
    es = torch.empty((), dtype=r.dtype).element_size()

    def column_blocks():
        col0 = 0
        for p in r.parts:
            for start, block in p.source.blocks(p.name, block_bytes):
                yield (col0 + start) * es, _bytes(block.to(r.dtype).t()).reshape(rows, -1)
            col0 += p.shape[0]
    write_columns(f, rows, cols * es, column_blocks(), bar)


def write_columns(f: _HashedFile, rows: int, row_bytes: int, blocks, bar) -> None:
    """Write a [rows, row_bytes] byte matrix at f.pos column block by column block: `blocks`
    yields (byte offset within a row, uint8 [rows, width]), one pwrite per row at its strided
    offset (module docstring). Used for transposed recipes and for quantized weights stored
    [K, N] (g3export.export.quant_stream)."""
    base = f.pos
    for c0, bt in blocks:
        for i in range(rows):
            f.pwrite(bt[i], base + i * row_bytes + c0)
        bar.update(bt.nbytes)
        del bt
    f.pos = base + rows * row_bytes
    f.catch_up()


def save_with_external_data(m: ir.Model, path: str | Path, progress: bool = True,
                            align_large: int = 65536, large: int = 1 << 20,
                            inline_below: int = 1024,
                            block_bytes: int | None = None) -> dict[str, dict]:
    """Write every initializer, one at a time, into `path`.data and the graph into `path`.
    Returns {data file name: {"size", "sha256", "mtime_ns"}} (hashed as written).

    Tensors of `large` bytes or more start at a multiple of `align_large` (page/allocation
    granularity, so ONNX Runtime can memory-map them); the rest at a multiple of 64. Tensors under
    `inline_below` bytes and int64 ones (shape constants: ORT's shape inference reads them) stay
    inline in the graph. block_bytes: the most float32 bytes of one tensor read at once (default
    BLOCK_BYTES, 32 MB: its transient copies stay a small fraction of the 4 GiB goal).
    """
    from tqdm import tqdm

    block_bytes = block_bytes or BLOCK_BYTES
    _fixed_mmap_threshold()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    inits = list(m.graph.initializers.values())
    aliases = [v for v in inits if getattr(v.const_value, "alias_of", None)]
    inits = [v for v in inits if v not in aliases]
    total = sum(v.const_value.nbytes for v in inits if v.const_value is not None)
    f = _HashedFile(path.parent / data_name)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {data_name}",
                  disable=not progress, leave=False) as bar:
            for v in inits:
                t = v.const_value
                if t is None:
                    continue
                if t.nbytes < inline_below or t.dtype == ir.DataType.INT64:
                    if isinstance(t, StreamTensor):  # inline: materialise the few bytes
                        v.const_value = ir.tensor(t.recipe.materialize(), name=v.name)
                    continue
                f.align(align_large if t.nbytes >= large else 64)
                offset = f.pos
                if isinstance(t, StreamTensor):
                    write_recipe(f, t.recipe, block_bytes, bar)
                elif hasattr(t, "write_blocks"):  # streams itself (onnx_quant.StreamedQuant)
                    t.write_blocks(f.write, block_bytes, bar)
                elif hasattr(t, "write_into"):  # streams itself, maybe strided (quant_stream)
                    t.write_into(f, block_bytes, bar)
                else:
                    f.write(t.tobytes())
                    bar.update(t.nbytes)
                if f.pos - offset != t.nbytes:
                    raise RuntimeError(f"{v.name}: wrote {f.pos - offset} bytes, expected "
                                       f"{t.nbytes}")
                v.const_value = ir.ExternalTensor(data_name, offset, t.nbytes, t.dtype,
                                                  shape=t.shape, name=v.name, base_dir=path.parent)
        for v in aliases:  # the same bytes as an initializer written above, another shape
            t, base = v.const_value, m.graph.initializers[v.const_value.alias_of].const_value
            if not isinstance(base, ir.ExternalTensor) or (base.nbytes, base.dtype) != (
                    t.nbytes, t.dtype):
                raise RuntimeError(f"{v.name}: its alias {t.alias_of} was not written with the "
                                   f"same bytes")
            v.const_value = ir.ExternalTensor(data_name, base.offset, t.nbytes, t.dtype,
                                              shape=t.shape, name=v.name, base_dir=path.parent)
    except BaseException:
        os.close(f.fd)
        raise
    digest = f.close()
    ir.save(m, path)
    return {data_name: digest}
