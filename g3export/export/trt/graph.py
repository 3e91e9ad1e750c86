"""What the ONNX graph of a TensorRT target looks like, as the exporter writes it (issue 12).

The engine builder parses the file the exporter wrote, by path (`OnnxParser.parse_from_file`,
which resolves the external data itself); nothing rewrites text.onnx afterwards. So everything
TensorRT needs is decided at export time, through `EnginePlan.export_options()`:

* `translation_table`/`opset`: the plugin or native attention translation.
* `tie_lm_head=False`: the tied embedding stays in torch.onnx's own form, ONE [vocab, hidden]
  initializer read by `Gather(axis=0)` (the lookup) and by `MatMul(x, Transpose(E))` (the
  lm_head). The ONNX Runtime layout ([1, hidden, vocab], `Gather(axis=2)` + `MatMul`,
  g3export.export.onnx_export._tie_lm_head) makes TensorRT-RTX store the embedding TWICE:
  measured with TensorRT-RTX 1.7.1's CPU-only build of an embedding-dominated config (the tiny
  preset with 262144 x 64 embedding rows, bf16, native attention: 34.0 MB of weights, 33.5 MB of
  them embedding), the engine is 82.5 MB with the ORT layout and 48.9 MB with this one, against
  15.4 MB for the same model with 512 rows: 67.0 MB (2.0 copies) vs 33.5 MB (1.0 copy) of
  embedding in the engine; a 2-D [vocab, hidden] `Gemm(transB=1)` lm_head also keeps one copy.
  BENCHMARKS.md §4.1 has the table and the command (benchmarks/trt_engine_bytes.py).
* `graph_passes` (`tensorrt_passes`), run on the in-memory graph before it is saved: the
  translation's `finalize`, then constant folding (`prepare_for_tensorrt`): the exporter
  (optimize=False) leaves e.g. ReduceMean's axes as Reshape(Constant), which TensorRT's parser
  refuses ("Axis input must resolve to a build-time constant"). onnxscript's folder never
  evaluates a large tensor (its size limits), so the weights are not read by these passes.
"""

from __future__ import annotations

from typing import Any, Callable


def prepare_for_tensorrt(model: Any) -> Any:
    """Fold constant subgraphs of an onnx_ir Model in place; returns the folder's result. Large
    initializers are never read or folded (the folder's size limits)."""
    from onnxscript.optimizer import fold_constants as _fold

    return _fold(model)


def tensorrt_passes(translation: Any) -> tuple[Callable[[Any], Any], ...]:
    """The passes that make an exported graph parseable by TensorRT, in order."""
    return (translation.finalize, prepare_for_tensorrt)
