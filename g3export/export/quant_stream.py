"""Quantized initializers that stream (DESIGN §3.6 "Weights stream", §3.9): the TensorRT
layouts of g3export.export.onnx_quant (blocked int4/int8 DequantizeLinear) and
g3export.export.onnx_fp8 (E4M3 DequantizeLinear), computed from the source weight one row
block at a time as the writer asks for the bytes, so a quantized build keeps the streaming
export's memory bound (nothing of a weight in memory beyond one block).

A `RowQuant` is one quantized initializer: a function of a row block of the source weight W
[N, K] (rows are independent in every scheme of g3export.export.quantize) that gives that
block's part of the result, [b, X] (codes, or scales). Two layouts:

* rows: the result's rows are W's rows, [N, X] (the untied embedding's DequantizeLinear along
  axis 1, per-channel scales): written sequentially;
* columns: the result is the transpose, [X, N] (the MatMul's B = W^T, and its [K/block, N]
  scales): a block of source rows is a block of output *columns*, written with one strided
  `pwrite` per output row (g3export.export.stream.write_columns, as a transposed recipe is).

ONNX INT4 packs two elements per byte along the flattened tensor, so in the columns layout a
source row block must hold an even number of rows: blocks are re-cut to even lengths (one row
carried to the next block). The eager form (`numpy()`, or an initializer small enough to stay
inline) runs the same block loop into memory, so both forms are one computation.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir
import torch

from . import quantize as Q
from .stream import Part, Recipe, StreamTensor, write_columns


def source_recipe(v: ir.Value, transposed: bool) -> Recipe:
    """The rows of W behind the initializer `v`: its stream recipe (W^T when `transposed`, W as
    is otherwise), or, for an initializer without one, a recipe over its values in memory."""
    cv = v.const_value
    if isinstance(cv, StreamTensor):
        if cv.recipe.transposed != transposed:
            raise ValueError(f"{v.name}: expected a {'transposed' if transposed else 'plain'} "
                             "recipe")
        return cv.recipe
    from ..modeling.sources import TensorSource

    a = torch.from_numpy(np.ascontiguousarray(cv.numpy()))
    w = a.reshape(-1, a.shape[-1]).t().contiguous() if transposed else a
    part = Part(TensorSource({v.name: w}, label="the graph"), v.name, tuple(w.shape))
    r = Recipe((part,), w.dtype, tuple(w.shape))
    return r.transpose() if transposed else r


def _source_rows(recipe: Recipe, block_bytes: int, even: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(first row n0, W[n0:n0+b] as float32) over every part's rows, in the build dtype first
    (quantize what the unquantized build would store); b even when `even`."""
    col0, carry = 0, None
    for p in recipe.parts:
        for start, rows in p.source.blocks(p.name, block_bytes):
            n0, w = col0 + start, rows.to(recipe.dtype).to(torch.float32).numpy()
            if carry is not None:
                n0, w = carry[0], np.concatenate([carry[1], w])
                carry = None
            if even and len(w) % 2:
                carry, w = (n0 + len(w) - 1, w[-1:].copy()), w[:-1]
            if len(w):
                yield n0, w
        col0 += p.shape[0]
    if carry is not None:
        raise ValueError(f"INT4 columns need an even N, got {col0}")


class _Memory:
    """The eager form's sink: the file interface write_columns uses, into a bytearray."""

    def __init__(self, n: int):
        self.buf, self.pos = np.zeros(n, np.uint8), 0

    def pwrite(self, data, offset: int) -> None:
        b = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        self.buf[offset:offset + len(b)] = b

    def write(self, data) -> None:
        self.pwrite(data, self.pos)
        self.pos += memoryview(data).nbytes

    def catch_up(self) -> None:
        pass


class _NoBar:
    def update(self, n: int) -> None:
        pass


class RowQuant(ir.LazyTensor):
    """fn(W[n0:n1] float32 [b, K]) -> [b, X]; stored as [N, X] (columns=False) or [X, N]
    (columns=True) in `dtype` (INT4: packed), reshaped to `shape` (module docstring)."""

    def __init__(self, recipe: Recipe, fn: Callable[[np.ndarray], np.ndarray], columns: bool,
                 dtype: ir.DataType, shape, name: str):
        super().__init__(self._whole, dtype=dtype, shape=ir.Shape(shape), name=name)
        self.recipe, self.fn, self.columns = recipe, fn, columns
        self.n = sum(p.shape[0] for p in recipe.parts)

    def _blocks(self, block_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
        int4 = self.dtype == ir.DataType.INT4
        for n0, w in _source_rows(self.recipe, block_bytes, even=int4 and self.columns):
            out = self.fn(w)
            out = np.ascontiguousarray(out.T if self.columns else out)
            out = Q.pack_int4_signed(out) if int4 else out.astype(self.dtype.numpy())
            yield n0, out.view(np.uint8)

    def write_into(self, f, block_bytes: int, bar) -> None:
        """Write the tensor's bytes at f.pos (f: stream._HashedFile or _Memory)."""
        if not self.columns:
            for _, out in self._blocks(block_bytes):
                f.write(out.reshape(-1))
                bar.update(out.nbytes)
            return
        rows = self.size // self.n
        row_bytes = self.nbytes // rows
        per_col = row_bytes / self.n  # bytes per output column: 0.5 for INT4
        write_columns(f, rows, row_bytes,
                      ((int(n0 * per_col), out) for n0, out in self._blocks(block_bytes)), bar)

    def _whole(self):
        from ..modeling.sources import BLOCK_BYTES

        mem = _Memory(self.nbytes)
        self.write_into(mem, BLOCK_BYTES, _NoBar())
        if self.dtype == ir.DataType.INT4:
            return ir.PackedTensor(mem.buf, self.dtype, shape=self.shape, name=self.name)
        return ir.Tensor(mem.buf.view(self.dtype.numpy()).reshape(self.shape.numpy()),
                         dtype=self.dtype, name=self.name)


def row_quant(g: ir.Graph, name: str, recipe: Recipe, fn, columns: bool, dtype: ir.DataType,
              shape) -> ir.Value:
    """Register a RowQuant initializer `name` in `g` and return its value."""
    t = RowQuant(recipe, fn, columns, dtype, shape, name)
    v = ir.Value(name=name, const_value=t, shape=ir.Shape(shape), type=ir.TensorType(dtype))
    g.register_initializer(v)
    return v
