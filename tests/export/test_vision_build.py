"""The vision component in a build (g3export.export.onnx_vision) and images through the compiled
ONNX runtime (OrtSession), against transformers' Gemma3ForConditionalGeneration.

The tiny random checkpoint, the pictures and the prompts are those of
tests/modeling/test_multimodal_parity.py (SigLIP 32 px / patch 4, 4 tokens per image; text with
both layer types, window 8 shorter than the prompt). g3export builds it from the save_pretrained
directory (build_model(checkpoint=...) then build(), default components: text + vision, text graph
taking image features). With one and with two images:

* image features from the vision graph equal HF's get_image_features (1, 2 and 3 images: the
  image count is dynamic);
* prefill logits: the build returns last-position logits, so the prompt is prefilled in chunks
  of 5 (prefill_chunks keeps images whole) and the last-position logits of EVERY chunk are
  compared with HF's logits at that position (HF: the whole prompt at once, with token_type_ids);
  this covers image chunks, text chunks after images and the ring-wrapping window;
* 20 greedy tokens equal HF's generate, prefilling in one chunk and in chunks of 5.

Then a random-weight 4b vision-only build (components=('vision',), text weights never
materialised): shapes, manifest, verify clean (slow: ~1.7 GB of fp32 weights, 4.5 minutes on
2 cores); and bad input through the CLI on the tiny build: clear error, non-zero exit, no
traceback.
"""

from __future__ import annotations

import json


import numpy as np
import pytest
import torch
from click.testing import CliRunner

from g3export.cli import main
from g3export.export.build import build
from g3export.export.manifest import BuildError, load_build
from g3export.runtimes.verify import verify
from g3export.modeling.weights import build_model
from g3export.runtimes.generate import generate, prefill_chunks
from g3export.runtimes.ort_session import OrtSession, VisionUnavailable

pytest.importorskip("onnxruntime")

from tests import multimodal as mm
from tests.multimodal import models, pixels  # noqa: F401  (module-scoped fixtures)

TINY, IMG, MM, DECODE = mm.TINY, mm.IMG, mm.MM, mm.DECODE
ATOL, RTOL = 1e-4, 1e-4  # fp32, ONNX Runtime vs PyTorch


@pytest.fixture(scope="module")
def tiny_build(models, tmp_path_factory):
    _, _, ckpt, _ = models
    out = tmp_path_factory.mktemp("vision_builds") / "tiny-vision-onnx"
    build(build_model(checkpoint=ckpt), None, out, max_context=128, progress=False)
    return out


@pytest.fixture(scope="module")
def session(tiny_build):
    return OrtSession.from_build(tiny_build)


def test_build_has_both_components(tiny_build):
    b = load_build(tiny_build)
    assert list(b.components) == ["text", "vision"]
    v = b.component("vision")
    assert v.file == "vision.onnx"
    assert [t.name for t in v.inputs] == ["pixel_values"]
    assert v.input("pixel_values").shape == ("images", 3, 32, 32)
    assert v.output("image_features").shape == ("images", MM, TINY.text.hidden_size)
    assert b.component("text").options["images"] is True
    assert {"vision.onnx", "vision.onnx.data", "text.onnx", "text.onnx.data"} <= set(
        b.manifest.files)
    # only vision weights in the vision graph, no vision weights in the text graph
    from g3export.export.onnx_export import initializer_bytes

    vis = [n for n, s in initializer_bytes(tiny_build / "vision.onnx").items() if s > 64]
    txt = initializer_bytes(tiny_build / "text.onnx")
    assert vis and all(n.startswith(("model.vision_tower.", "model.multi_modal_projector."))
                       for n in vis)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in txt)


def test_verify_checks_vision_and_image_chunk(tiny_build):
    rep = verify(tiny_build, vision_images=2)
    assert rep.ok, rep.format()
    assert rep.components == ["text", "vision"] and rep.vision_shape == [2, MM, 64]
    assert any(s["kind"] == "prefill+image" for s in rep.steps)


def test_inspect_shows_vision(tiny_build):
    r = CliRunner().invoke(main, ["inspect", str(tiny_build), "--json"])
    assert r.exit_code == 0, r.output
    assert "vision" in json.loads(r.output)["components"]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_image_features_match_hf(models, pixels, session, n):
    hf, *_ = models
    got = session.image_features(pixels[:n].numpy())
    want = mm._hf_features(hf, pixels[:n]).numpy()
    assert got.shape == want.shape == (n, MM, TINY.text.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_images", [1, 2])
def test_prefill_logits_and_greedy_tokens_match_hf(models, pixels, session, n_images):
    hf, *_ = models
    pv = pixels[:n_images]
    ids = mm._prompt(n_images, seed=n_images)
    n = ids.shape[1]
    assert n > 3 * TINY.text.sliding_window
    feats = session.image_features(pv.numpy())
    flat = feats.reshape(-1, feats.shape[-1])
    hf_logits = mm._hf_prefill(hf, ids, pv).numpy()

    chunks = prefill_chunks(ids[0].tolist(), 5, IMG)
    assert len(chunks) > n_images + 2
    session.reset()
    used = 0
    for s, e in chunks:
        m = int((ids[0, s:e] == IMG).sum())
        assert m in (0, MM, 2 * MM)
        f = flat[used:used + m] if m else None
        used += m
        got = session.forward(ids[:, s:e].numpy(), s, f)
        np.testing.assert_allclose(got[0], hf_logits[e - 1], atol=ATOL, rtol=RTOL,
                                   err_msg=f"chunk [{s}, {e})")

    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=pv, token_type_ids=(ids == IMG).long(),
                          max_new_tokens=DECODE, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    hf_tokens = out[0, n:].tolist()
    for chunk in (512, 5):
        r = generate(session, ids[0].tolist(), DECODE, stop_ids=[], chunk_size=chunk,
                     image_features=feats)
        assert r.token_ids == hf_tokens, f"chunk_size {chunk}"


def test_text_only_components_and_missing_vision(models, tmp_path):
    _, _, ckpt, _ = models
    out = build(build_model(checkpoint=ckpt), None, tmp_path / "t", max_context=32,
                progress=False, components=("text",))
    b = load_build(out)
    assert list(b.components) == ["text"] and b.component("text").options["images"]
    with pytest.raises(VisionUnavailable, match="--components text,vision"):
        OrtSession.from_build(out).image_features(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(BuildError, match="no vision encoder"):
        build(build_model("tiny", weights="random"), None, tmp_path / "x", max_context=32,
              progress=False, components=("vision",))
    with pytest.raises(BuildError, match="unknown components"):
        build(build_model("tiny", weights="random"), None, tmp_path / "y", max_context=32,
              progress=False, components=("audio",))


def test_cli_build_components(tmp_path):
    out = tmp_path / "v"
    r = CliRunner().invoke(main, ["build", "--size", "tiny-vision", "--weights", "random",
                                  "--components", "vision", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert list(load_build(out).components) == ["vision"]
    assert verify(out).ok
    for comps, words in (("vision", "no vision encoder"), ("text,audio", "unknown components")):
        r = CliRunner().invoke(main, ["build", "--size", "tiny", "--weights", "random",
                                      "--components", comps, "--out", str(tmp_path / "x")])
        assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
        assert words in r.output


# -- bad input through the CLI --------------------------------------------------------------------

def _ids(n_images: int) -> str:
    ids = [2, 7, 8]
    for _ in range(n_images):
        ids += [TINY.boi_token_id] + [IMG] * MM + [TINY.eoi_token_id, 9]
    return ",".join(map(str, ids))


def _run(*args):
    r = CliRunner().invoke(main, ["run", *map(str, args)])
    assert r.exit_code != 0, r.output
    # a ClickException/UsageError ends in SystemExit; anything else would be a traceback
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    return r.output


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, pixels):
    from PIL import Image

    d = tmp_path_factory.mktemp("bad_images")
    good = d / "good.png"
    mm._picture(40, 40, 0).save(good)
    (d / "empty.png").write_bytes(b"")
    data = good.read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "notes.jpg").write_text("this is not an image\n")
    Image.new("RGB", (8, 8)).save(d / "pic.tiff")
    return d


def test_cli_good_image_runs(tiny_build, bad_files):
    r = CliRunner().invoke(main, ["run", str(tiny_build), "--image", str(bad_files / "good.png"),
                                  "--prompt-ids", _ids(1), "--max-new-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output.strip().splitlines()[-1])["token_ids"]) == 3


@pytest.mark.parametrize("name,words", [
    ("missing.png", "does not exist"), ("empty.png", "empty"), ("truncated.png", "truncated"),
    ("notes.jpg", "not an image"), ("pic.tiff", "not supported")])
def test_cli_bad_image_files(tiny_build, bad_files, name, words):
    out = _run(tiny_build, "--image", bad_files / name, "--prompt-ids", _ids(1))
    assert words in out and "Error:" in out


def test_cli_image_to_text_only_build(tmp_path, bad_files):
    out = build(build_model("tiny", weights="random"), None, tmp_path / "text-only",
                max_context=32, progress=False)
    msg = _run(out, "--image", bad_files / "good.png", "--prompt-ids", "2,7,8")
    assert "no vision encoder" in msg


def test_cli_more_images_than_context(tiny_build, bad_files):
    n = 128 // (MM + 3) + 1  # each image: boi, 4 image tokens, eoi, one text token
    msg = _run(tiny_build, *[a for _ in range(n) for a in ("--image", bad_files / "good.png")],
               "--prompt-ids", _ids(n))
    assert "context holds 128" in msg


# -- the 4b vision graph with random weights -----------------------------------------------------

@pytest.mark.slow
def test_4b_vision_only_random_build(tmp_path):
    """269 s on 2 cores, load ~2 (export + write 1.7 GB, hash, verify = graph + reference on one
    896 px image); the text weights (~15 GB fp32) are never allocated."""
    from g3export.export.onnx_vision import vision_only_model

    model = vision_only_model("4b")
    assert all(p.is_meta for p in model.language_model.parameters())
    out = build(model, None, tmp_path / "4b-vision", max_context=4096, progress=False,
                components=("vision",))
    del model
    b = load_build(out)
    assert list(b.components) == ["vision"]
    v = b.component("vision")
    assert v.input("pixel_values").shape == ("images", 3, 896, 896)
    assert v.output("image_features").shape == ("images", 256, 2560)
    assert b.config.name == "4b"
    assert set(b.manifest.files) == {"vision.onnx", "vision.onnx.data"}
    assert 1.6e9 < b.manifest.files["vision.onnx.data"].size < 1.8e9
    rep = verify(out)
    assert rep.ok, rep.format()
    assert rep.vision_shape == [1, 256, 2560]


# --- the native TensorRT translation with images, run by ONNX Runtime (issue 7) ----------------

class _NativeFileSession:
    """The native text graph (opset-24 Attention + TensorScatter) on ONNX Runtime's CPU, its caches
    fed back as separate arrays (the in-place write is TensorRT's KV-cache-update layer's job; ORT
    checks the numbers), with the runtime's chunk rule for this translation (chunk_align)."""

    def __init__(self, path, io, config, max_context: int):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.io, self.config, self.max_context, self.batch = io, config, max_context, 1
        self.prefill_chunk = None
        self.chunk_align = config.text.sliding_window
        self.reset()

    def reset(self):
        self.caches = {t.name: np.zeros([1, *t.shape[1:]], np.float32)
                       for t in self.io.inputs if t.name.startswith("past_")}

    def forward(self, ids, start_pos, image_features=None):
        from g3export.export.onnx_native_attention import check_chunk

        for t in self.io.inputs:
            if t.name.startswith("past_"):
                check_chunk(start_pos, ids.shape[1], t.shape[2])
        feats = (np.zeros((1, self.config.text.hidden_size), np.float32)
                 if image_features is None else image_features)
        outs = self.sess.run(None, {"input_ids": ids.astype(np.int64),
                                    "start_pos": np.array([start_pos], np.int64),
                                    "image_features": feats.astype(np.float32), **self.caches})
        for o, value in zip(self.sess.get_outputs(), outs):
            if o.name.startswith("present_"):
                self.caches[o.name.replace("present_", "past_")] = value
        return outs[0][:, -1]


def _aligned_prompt(n_images: int) -> torch.Tensor:
    """Images placed so that none crosses a multiple of the window (8): the native translation's
    chunks never do, and an image is never split. 30+ tokens: past the window."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 500, (3,), generator=g).tolist()
    for i in range(n_images):
        ids += [mm.BOI] + [IMG] * MM + [mm.EOI]          # images at [4, 8) and [16, 20)
        ids += torch.randint(3, 500, (6 if i + 1 < n_images else 20,), generator=g).tolist()
    return torch.tensor([ids])


@pytest.mark.parametrize("n_images", [1, 2])
def test_native_translation_with_images_on_ort(models, pixels, tmp_path, n_images):
    """The text graph of the native translation, exported with image features, gives HF's greedy
    tokens (prefill in window-aligned chunks of at most 5 and 8 tokens, then decode past the
    window)."""
    import onnx_ir as ir

    from g3export.export import onnx_export as oe
    from g3export.export import translations
    from g3export.export.trt import tensorrt_passes

    hf, _, ckpt, _ = models
    tr = translations.get("native")
    max_context = 64
    # the graph exactly as a TensorRT build writes it (EnginePlan.export_options)
    io = oe.export_text(build_model(checkpoint=ckpt), tmp_path, max_context, images=True,
                        progress=False, translation_table=tr.table, opset=tr.opset,
                        tie_lm_head=False, graph_passes=tensorrt_passes(tr))
    m = ir.load(tmp_path / "text.onnx")
    attention = [n for n in m.graph if n.op_type == "Attention"]
    assert len(attention) == TINY.text.num_hidden_layers
    assert all(len(n.outputs) == 1 for n in attention)
    assert "TensorScatter" in {n.op_type for n in m.graph}
    assert "RotaryEmbedding" not in {n.op_type for n in m.graph}  # standard ONNX only
    sess = _NativeFileSession(tmp_path / "text.onnx", io, TINY, max_context)

    pv = pixels[:n_images]
    ids = _aligned_prompt(n_images)
    with torch.no_grad():
        feats = mm._hf_features(hf, pv).numpy()
        out = hf.generate(input_ids=ids, pixel_values=pv, token_type_ids=(ids == IMG).long(),
                          max_new_tokens=DECODE, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    hf_tokens = out[0, ids.shape[1]:].tolist()
    for chunk in (5, 8):
        r = generate(sess, ids[0].tolist(), DECODE, stop_ids=[], chunk_size=chunk,
                     image_features=feats)
        assert r.token_ids == hf_tokens, f"chunk_size {chunk}"
