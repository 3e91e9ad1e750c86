"""Quantized builds (issue 14) on the tiny preset: int4/int8 ONNX builds run in ONNX Runtime and
match a fake-quantized PyTorch reference (the same model with every decoder linear and the tied
embedding replaced by dequantize(quantize(W)), computed by numpy from the scheme's definition);
`g3export eval` equals a direct computation of perplexity and KL on the same logits; TensorRT-RTX
builds engines from int4 and int8 graphs; the manifest records the scheme."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from g3export.export import quantize as Q
from g3export.export.build import build
from g3export.modeling.config import preset
from g3export.modeling.text import Gemma3Model
from g3export.runtimes.evaluate import evaluate
from g3export.runtimes.ort_session import OrtSession
from g3export.runtimes.reference import TorchSession

MAX_CONTEXT = 64
PROJ = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def _model() -> Gemma3Model:
    torch.manual_seed(0)
    return Gemma3Model(preset("tiny")).eval()


def _round_trip(quant, w, bits, block):
    """dequantize(quant(w)): quant returns (codes, scales) or (codes, scales, zero points)."""
    q, s, *z = quant(w, bits, block)
    return Q.dequantize_rows(q, s, block, *z)


def fake_quantized(model: Gemma3Model, bits: int, block: int,
                   quant=Q.quantize_rows) -> Gemma3Model:
    """The model a quantized build should compute: each [N, K] weight -> W~ (blocks along K)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if PROJ.search(name) or name.endswith("embed_tokens.weight"):
                w = p.detach().numpy()
                p.copy_(torch.from_numpy(_round_trip(quant, w, bits, block)))
    return m


def _transposed(quant):
    """A wrong quantizer: blocks along N instead of K (what a transposed layout computes)."""
    def wrong(w, bits, block):
        wt = _round_trip(quant, np.ascontiguousarray(w.T), bits, block).T
        return quant(np.ascontiguousarray(wt), bits, block)
    return wrong


# build name -> (scheme, symmetric, the quantizer its weights should equal)
SCHEMES = {"int4": ("int4", None, Q.quantize_rows_full),      # int4's default: [-8, 7] searched
           "int4-asym": ("int4", False, Q.quantize_rows_asym),   # zero points
           "int8": ("int8", None, Q.quantize_rows)}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("qbuilds")
    out = {"fp32": build(_model(), None, root / "fp32", max_context=MAX_CONTEXT, progress=False)}
    for name, (scheme, sym, _) in SCHEMES.items():
        out[name] = build(_model(), None, root / name, max_context=MAX_CONTEXT,
                          progress=False, quant=Q.QuantScheme(scheme, 32, symmetric=sym))
    return out


def _logits(sess, ids, chunks=(5, 11, 24), decode=8):
    """Prefill in chunks past the window (8), then teacher-forced decode steps."""
    out, pos = [], 0
    for c in chunks:
        out.append(sess.forward(ids[:, pos:pos + c], pos))
        pos += c
    for _ in range(decode):
        out.append(sess.forward(ids[:, pos:pos + 1], pos))
        pos += 1
    return np.concatenate(out)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_quantized_build_matches_fake_quantized_reference(builds, name):
    """The bound comes from the quantization error itself: the weight quantization moves the
    logits by e_w = max|ref - ref~| (ref~: the fake-quantized model); what remains between the
    ORT build and ref~ is only MatMulNBits' accuracy_level-4 activation quantization (8-bit per
    block, so no larger than an 8-bit weight quantization's effect) and float order. The build
    must be within e_w(int8) of ref~, and must NOT be within it of a reference whose blocks run
    along N (transposed scales): the bound tells the right layout from the wrong one."""
    scheme, _, quant = SCHEMES[name]
    bits = Q.WEIGHT_ONLY[scheme]
    model = _model()
    ids = np.random.default_rng(7).integers(0, 512, (1, 48))
    ref = _logits(TorchSession(model, MAX_CONTEXT), ids)
    fq = _logits(TorchSession(fake_quantized(model, bits, 32, quant), MAX_CONTEXT), ids)
    fq8 = fq if bits == 8 else _logits(TorchSession(fake_quantized(model, 8, 32), MAX_CONTEXT), ids)
    wrong = _logits(TorchSession(fake_quantized(model, bits, 32, _transposed(quant)),
                                 MAX_CONTEXT), ids)
    got = _logits(OrtSession.from_build(builds[name]), ids)
    e_w = float(np.abs(ref - fq).max())
    e_w8 = float(np.abs(ref - fq8).max())
    err = float(np.abs(got - fq).max())
    print(f"{name}: weight-quant effect {e_w:.4f}, int8 effect {e_w8:.4f}, build vs ref~ "
          f"{err:.4f}, build vs wrong layout {np.abs(got - wrong).max():.4f}")
    assert e_w > 0
    assert err <= e_w8
    assert float(np.abs(got - wrong).max()) > e_w8
    # and the fp32 build is the reference (nothing quantized there)
    assert float(np.abs(_logits(OrtSession.from_build(builds["fp32"]), ids) - ref).max()) < 1e-3


def test_batched_rows_match_batch_one(builds):
    """A quantized build run with two rows at different positions (each prefilled on its own,
    then one decode step of both, as the scheduler does) gives each row the logits of a batch-1
    session: the lm_head (MatMulNBits on the [B, T, hidden] rows as they come) keeps the rows
    apart."""
    ids = np.random.default_rng(3).integers(0, 512, (2, 20))
    lens = (12, 7)
    two = OrtSession.from_build(builds["int4"], batch=2)
    got = [[two.forward_row(r, ids[r:r + 1, :n], 0)[0]] for r, n in enumerate(lens)]
    step = two.forward(np.array([[ids[r, n]] for r, n in enumerate(lens)]), np.array(lens))
    one = OrtSession.from_build(builds["int4"])
    for r, n in enumerate(lens):
        got[r].append(step[r])
        one.reset()
        want = [one.forward(ids[r:r + 1, :n], 0)[0], one.forward(ids[r:r + 1, n:n + 1], n)[0]]
        for g, w in zip(got[r], want):
            assert np.abs(g - w).max() < 1e-3, r


def test_manifest_and_graph(builds):
    import onnx

    man = json.loads((builds["int4"] / "manifest.json").read_text())
    q = man["quantization"]
    assert (q["scheme"], q["bits"], q["block"], q["embedding"]) == ("int4", 4, 32, True)
    assert (q["symmetric"], q["zero_points"]) == (True, False)  # int4's default
    asym = json.loads((builds["int4-asym"] / "manifest.json").read_text())["quantization"]
    assert (asym["symmetric"], asym["zero_points"]) == (False, True)
    assert man["components"]["text"]["options"]["quantization"] == {"linear": 12 + 12,
                                                                    "embedding": 1}
    g = onnx.load(str(builds["int4-asym"] / "text.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("MatMulNBits") == 25 and ops.count("GatherBlockQuantized") == 1
    # every quantized op reads its zero points (the fourth input)
    assert all(len(n.input) == 4 and n.input[3] for n in g.node
               if n.op_type in ("MatMulNBits", "GatherBlockQuantized"))
    g = onnx.load(str(builds["int4"] / "text.onnx"), load_external_data=False).graph
    assert all(len(n.input) == 3 for n in g.node
               if n.op_type in ("MatMulNBits", "GatherBlockQuantized"))
    # the lm_head writes the logits itself: no Reshape (a copy into the bound output) after it
    (head,) = [n for n in g.node if "logits" in n.output]
    assert head.op_type == "MatMulNBits" and head.attribute and \
        {a.name: a.i for a in head.attribute}["N"] == preset("tiny").text.vocab_size
    # and `inspect` says which
    from click.testing import CliRunner

    from g3export.cli import main

    out = {k: CliRunner().invoke(main, ["inspect", str(builds[k])]).output
           for k in ("int4", "int4-asym")}
    assert "quantization: int4 block=32  asymmetric (zero points)" in out["int4-asym"]
    assert "quantization: int4 block=32  symmetric  quantized" in out["int4"]
    # no float copy of a quantized weight is left
    assert not [t.name for t in g.initializer if t.name.endswith("proj.weight.T")
                or t.name.endswith("embed_tokens.weight.T")]
    size = {k: sum(p.stat().st_size for p in v.iterdir()) for k, v in builds.items()}
    assert size["int4"] < size["int8"] < size["fp32"]


def test_eval_equals_direct_computation(builds):
    """evaluate() against torch's own log_softmax / kl_div on the same per-position logits."""
    ids = np.random.default_rng(3).integers(0, 512, 30).tolist()
    a, b = OrtSession.from_build(builds["int4"]), OrtSession.from_build(builds["fp32"])
    r = evaluate(a, ids, b)
    la, lb = [], []
    for sess, out in ((a, la), (b, lb)):
        sess.reset()
        for i in range(len(ids) - 1):
            out.append(sess.forward(np.array([[ids[i]]]), i)[0])
    la, lb = torch.tensor(np.stack(la), dtype=torch.float64), torch.tensor(np.stack(lb), dtype=torch.float64)
    tgt = torch.tensor(ids[1:])
    ppl = torch.exp(torch.nn.functional.cross_entropy(la, tgt)).item()
    ppl_ref = torch.exp(torch.nn.functional.cross_entropy(lb, tgt)).item()
    kl = torch.nn.functional.kl_div(torch.log_softmax(la, -1), torch.log_softmax(lb, -1),
                                    log_target=True, reduction="none").sum(-1)
    assert r.tokens == 30
    assert r.perplexity == pytest.approx(ppl, rel=1e-9)
    assert r.reference_perplexity == pytest.approx(ppl_ref, rel=1e-9)
    assert r.kl_mean == pytest.approx(kl.mean().item(), rel=1e-9)
    assert r.kl_max == pytest.approx(kl.max().item(), rel=1e-9)
    assert r.top1_agreement == pytest.approx((la.argmax(-1) == lb.argmax(-1)).double().mean().item())
    assert r.max_abs_logit_diff == pytest.approx((la - lb).abs().max().item(), rel=1e-9)
    assert r.kl_mean > 0 and evaluate(b, ids, b).kl_mean == pytest.approx(0, abs=1e-12)
    # the text runs past max_context: cut, and said so
    long = evaluate(b, ids * 3)
    assert (long.tokens, long.truncated_from) == (MAX_CONTEXT, 90)


@pytest.mark.parametrize("symmetric", [True, False])
def test_streamed_codes_equal_the_per_tensor_quantizer(tmp_path, monkeypatch, symmetric):
    """The weights stream in row blocks (here 4 KB, so every weight takes several blocks); the
    written codes, scales (and zero points) are byte-equal to quantizing each whole weight at
    once, for a plain weight, the fused q/k/v and gate/up ones (quantized graphs fuse both) and
    the tied embedding."""
    import onnx
    from onnx import numpy_helper

    from g3export.export import stream

    monkeypatch.setattr(stream, "BLOCK_BYTES", 4096)
    model = _model()
    out = build(_model(), None, tmp_path / "int4", max_context=MAX_CONTEXT, progress=False,
                quant=Q.QuantScheme("int4", 32, symmetric=symmetric))
    inits = {t.name: numpy_helper.to_array(t) for t in
             onnx.load(str(out / "text.onnx")).graph.initializer}
    p = dict(model.named_parameters())
    lm = "model.language_model."
    wq = [p[f"language_model.layers.2.self_attn.{x}_proj.weight"].detach().numpy() for x in "qkv"]
    wg = [p[f"language_model.layers.2.mlp.{x}_proj.weight"].detach().numpy() for x in ("gate", "up")]
    cases = {
        f"{lm}layers.2.mlp.down_proj.weight": p["language_model.layers.2.mlp.down_proj.weight"].detach().numpy(),
        "+".join(f"{lm}layers.2.self_attn.{x}_proj.weight.T" for x in "qkv"): np.concatenate(wq),
        "+".join(f"{lm}layers.2.mlp.{x}_proj.weight.T" for x in ("gate", "up")): np.concatenate(wg),
        f"{lm}embed_tokens.weight": p["language_model.embed_tokens.weight"].detach().numpy()}
    for base, w in cases.items():
        b, s, *z = Q.matmul_nbits(w, 4, 32, symmetric=symmetric)
        np.testing.assert_array_equal(inits[f"{base}.q4"], b)
        np.testing.assert_array_equal(inits[f"{base}.scales"], s)
        if not symmetric:
            np.testing.assert_array_equal(inits[f"{base}.zero_points"], z[0])
            if base.endswith("embed_tokens.weight"):
                zero = Q.quantize_rows_asym(w, 4, 32)[2]
                np.testing.assert_array_equal(inits[f"{base}.zero_points_gather"],
                                              zero[:, :, None])
        else:
            assert f"{base}.zero_points" not in inits


@pytest.mark.parametrize("args,match", [
    (["--quant", "int4", "--quant-block", "128"], "does not divide the model's hidden_size"),
    (["--quant", "fp8"], "fp8 is for the TensorRT targets"),
    (["--quant", "fp8", "--target", "trt-rtx", "--calibration", "/nonexistent.txt"],
     "calibration file /nonexistent.txt not found"),
    (["--calibration", "x.txt"], "options of --quant"),
    (["--quant-asymmetric"], "options of --quant"),
    (["--quant", "int4", "--quant-asymmetric", "--target", "trt-rtx"],
     "--quant-asymmetric is for --target onnx"),
])
def test_bad_quant_options_are_one_line_errors(tmp_path, args, match):
    from click.testing import CliRunner

    from g3export.cli import main

    r = CliRunner().invoke(main, ["build", "--size", "tiny", "--weights", "random", "--out",
                                  str(tmp_path / "x"), *args])
    assert r.exit_code != 0
    assert match in r.output and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and match in errors[0]  # one line (after click's usage hint)
    assert not (tmp_path / "x").exists()
