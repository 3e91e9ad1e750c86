"""How many copies of the weights a TensorRT-RTX engine holds: by embedding layout, and with one
optimization profile (g3export's) against the two (`prefill` + `decode`) of builds before issue 12.

    python benchmarks/trt_engine_bytes.py [--vocab 262144] [--hidden 64] [--intermediate N]
        [--out /tmp/g3-engine-bytes]

Builds the tiny preset with a `vocab x hidden` embedding (random bf16 weights, native attention,
max_context 48, TensorRT-RTX's default compute capabilities) as a `--target trt-rtx` build (the
graph exactly as g3export writes it for TensorRT: [vocab, hidden], Gather + MatMul(x,
Transpose(E))), then re-writes that graph with the ONNX Runtime layout of the embedding
([1, hidden, vocab], Gather(axis=2) + MatMul, g3export.export.onnx_export._tie_lm_head) and with
a 2-D Gemm(transB=1) lm_head, builds an engine from each, and builds the same model with a
512-row vocabulary for the engine's fixed part (kernels). Prints, per layout, the engine bytes
and the copies of the embedding in it: (engine - fixed part) / embedding bytes, and the peak RSS
of the engine builder's child process (it parses the file by path). Then builds g3export's graph
once more with the two profiles builds had before issue 12 (`prefill`: seq 1..chunk, opt chunk;
`decode`: seq 1). `--intermediate` widens the MLP so that the per-layer weights dominate (the
profile effect is on them; the embedding is not duplicated per profile). No GPU needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np


def _build(vocab: int, hidden: int, out: Path, intermediate: int | None = None) -> Path:
    import torch

    from g3export.export.build import build
    from g3export.modeling.config import preset
    from g3export.modeling.weights import build_model

    tiny = preset("tiny")
    cfg = dataclasses.replace(tiny, name=f"tiny-{vocab}x{hidden}", text=dataclasses.replace(
        tiny.text, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=intermediate or tiny.text.intermediate_size))
    model = build_model(cfg, weights="random", dtype=torch.bfloat16)
    return build(model, None, out, target="trt-rtx", dtype="bf16", max_context=48, force=True,
                 progress=False, trt_options={"attention": "native"})


def _variant(src: Path, kind: str, out: Path) -> Path:
    """src's text.onnx with the embedding in another layout ('ort_3d' | 'gemm_transB')."""
    import onnx_ir as ir

    from g3export.export.onnx_export import save_with_external_data

    m = ir.load(str(src / "text.onnx"))
    g = m.graph
    e = next(v for v in g.initializers.values() if v.name.endswith("embed_tokens.weight"))
    vocab, hidden = e.shape
    raw = np.frombuffer(e.const_value.tobytes(), np.uint16).reshape(vocab, hidden)  # bf16 bits

    def const(name, vals):
        v = ir.Value(name=name, const_value=ir.tensor(np.array(vals, np.int64), name=name),
                     shape=ir.Shape([len(vals)]), type=ir.TensorType(ir.DataType.INT64))
        g.register_initializer(v)
        return v

    def take_over(old, new):
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name, new.name = None, name

    gather = next(n for n, _ in e.uses() if n.op_type == "Gather")
    tr = next(n for n, _ in e.uses() if n.op_type == "Transpose")
    mm = next(iter(tr.outputs[0].uses()))[0]
    if kind == "ort_3d":
        t = ir.Tensor(np.ascontiguousarray(raw.T)[None], dtype=ir.DataType.BFLOAT16, name="ET")
        et = ir.Value(name="ET", const_value=t, shape=ir.Shape([1, hidden, vocab]),
                      type=ir.TensorType(ir.DataType.BFLOAT16))
        g.register_initializer(et)
        n1 = ir.node("Gather", [et, gather.inputs[1]], attributes={"axis": 2})
        n2 = ir.node("Transpose", [n1.outputs[0]], attributes={"perm": [2, 3, 1, 0]})
        n3 = ir.node("Squeeze", [n2.outputs[0], const("sq3", [3])])
        g.insert_before(gather, [n1, n2, n3])
        take_over(gather.outputs[0], n3.outputs[0])
        g.remove(gather, safe=True)
        n4 = ir.node("MatMul", [mm.inputs[0], et])
        g.insert_before(mm, [n4])
    else:  # gemm_transB: x [B, T, H] -> [B*T, H] @ E^T -> [B, T, V] (batch 1 profiles)
        n0 = ir.node("Reshape", [mm.inputs[0], const("flat", [-1, hidden])])
        n1 = ir.node("Gemm", [n0.outputs[0], e], attributes={"transB": 1})
        n4 = ir.node("Reshape", [n1.outputs[0], const("unflat", [1, -1, vocab])])
        g.insert_before(mm, [n0, n1, n4])
    take_over(mm.outputs[0], n4.outputs[0])
    g.remove(mm, safe=True)
    g.remove(tr, safe=True)
    if not list(e.uses()):
        g.initializers.pop(e.name)
    save_with_external_data(m, out / "text.onnx", progress=False)
    return out / "text.onnx"


def _two_profiles(io, chunk: int) -> list:
    """The profiles of builds before issue 12: `prefill` (seq 1..chunk, opt chunk) and `decode`
    (seq 1), batch 1, image rows 1..chunk."""
    from g3export.export.trt import Profile

    def resolve(shape, seq):
        dims = [(d, d, d) if isinstance(d, int) else {"seq": seq, "batch": (1, 1, 1),
                                                     "image_tokens": (1, chunk, chunk)}[d]
                for d in shape]
        return tuple(tuple(v[i] for v in dims) for i in range(3))

    return [Profile(name, {t.name: resolve(t.shape, seq) for t in io.inputs
                           if any(isinstance(d, str) for d in t.shape)})
            for name, seq in (("prefill", (1, chunk, chunk)), ("decode", (1, 1, 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=None,
                    help="MLP width (default: the tiny preset's)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/g3-engine-bytes"))
    a = ap.parse_args()

    from g3export.export.manifest import load_build
    from g3export.export.trt import Profile, build_engine

    shutil.rmtree(a.out, ignore_errors=True)
    small = load_build(_build(512, a.hidden, a.out / "small", a.intermediate))
    fixed = small.manifest.to_dict()["tensorrt"]["engines"]["text"]["bytes"]
    big = load_build(_build(a.vocab, a.hidden, a.out / "big", a.intermediate))
    section = big.manifest.to_dict()["tensorrt"]
    weights = big.manifest.to_dict()["files"]["text.onnx.data"]["size"]
    embed = a.vocab * a.hidden * 2
    engine = big.tensorrt.engines["text"]
    profiles = [Profile(p["name"], {k: tuple(tuple(x) for x in v) for k, v in p["shapes"].items()})
                for p in engine.profiles]
    rows = [("g3export (TensorRT graph): [V, H], Gather + MatMul(x, Transpose(E)); one profile",
             section["engines"]["text"]["bytes"], section["engines"]["text"]["peak_rss_mb"])]
    for kind, label in (("ort_3d", "ONNX Runtime layout: [1, H, V], Gather(axis=2) + MatMul"),
                        ("gemm_transB", "[V, H], Gather + Gemm(transB=1)")):
        onnx = _variant(big.root, kind, a.out / kind)
        info = build_engine(onnx, a.out / kind / "text.engine", "trt-rtx", profiles=profiles,
                            dtype="bf16", plugins=(), isolate=True)
        rows.append((label, info.bytes, info.peak_rss_mb))
    two = _two_profiles(big.component("text"), section["prefill_chunk"])
    info = build_engine(big.path(engine.onnx), a.out / "two.engine", "trt-rtx", profiles=two,
                        dtype="bf16", plugins=(), isolate=True)
    rows.append(("g3export's graph, two profiles (prefill, decode: before issue 12)", info.bytes,
                 info.peak_rss_mb))
    print(f"tiny preset, embedding {a.vocab} x {a.hidden} bf16 = {embed:,} B; weights "
          f"{weights:,} B; engine of the 512-row model (fixed part) {fixed:,} B")
    print("| graph | engine bytes | engine / weights | embedding copies | builder peak "
          "RSS MiB |")
    print("|---|---|---|---|---|")
    for label, n, peak in rows:
        print(f"| {label} | {n:,} | {n / weights:.2f} | {(n - fixed) / embed:.2f} | {peak:.0f} |")
    shutil.rmtree(a.out, ignore_errors=True)


if __name__ == "__main__":
    main()
