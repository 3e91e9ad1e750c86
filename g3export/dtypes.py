"""The model dtypes a build can have, as one table: name -> torch dtype, numpy dtype, ONNX element
type, bytes per element. Every module that maps a dtype name reads it here.

    name   torch           numpy (storage)   TensorSpec / ONNX name   ONNX enum   bytes
    fp32   torch.float32   float32           float32                  1 (FLOAT)   4
    fp16   torch.float16   float16           float16                  10          2
    bf16   torch.bfloat16  uint16 (*)        bfloat16                 16          2

(*) numpy has no bfloat16: a bf16 buffer is held as uint16 (same size) and handed to ONNX
Runtime with its ONNX element type (`OrtValue.ortvalue_from_numpy_with_onnx_type`), no copy.

torch and onnx_ir are imported only when their attribute is read, so the runtimes and the build
manifest (which must open a build without torch: g3export.export.manifest) can use this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str             # what the CLI and the manifest say: fp32 | fp16 | bf16
    onnx_name: str        # the element type's name in a TensorSpec (numpy-style)
    onnx_type: int        # onnx.TensorProto.DataType (= onnx_ir.DataType) value
    bytes: int
    numpy: Any            # numpy dtype of a host buffer (bf16: uint16 storage, see above)

    @property
    def torch(self) -> Any:
        import torch

        return getattr(torch, self.onnx_name)

    @property
    def ir(self) -> Any:
        """The onnx_ir.DataType."""
        import onnx_ir as ir

        return ir.DataType(self.onnx_type)


DTYPES: dict[str, DType] = {
    "fp32": DType("fp32", "float32", 1, 4, np.dtype(np.float32)),
    "fp16": DType("fp16", "float16", 10, 2, np.dtype(np.float16)),
    "bf16": DType("bf16", "bfloat16", 16, 2, np.dtype(np.uint16)),
}
NAMES = tuple(DTYPES)  # the CLI's --dtype choices

# element types a graph's I/O can have (TensorSpec.dtype) -> numpy dtype of a host buffer
ONNX_NUMPY = {**{d.onnx_name: d.numpy for d in DTYPES.values()}, "int64": np.dtype(np.int64)}
# ONNX Runtime's type strings ("tensor(float)") -> bytes per element
ORT_TYPE_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2,
                  "tensor(int64)": 8}


def dtype(name: str) -> DType:
    """The DType called `name`; ValueError naming the valid ones otherwise."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}; use one of: {', '.join(NAMES)}") from None
