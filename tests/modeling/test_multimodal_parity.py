"""Multimodal parity with transformers' Gemma3ForConditionalGeneration on a tiny random checkpoint
written by save_pretrained (the 'tiny-vision' shapes: SigLIP 32 px / patch 4 / hidden 32 / 2 layers
/ 4 heads, 4 tokens per image; text 6 layers with pattern 3, so both layer types, window 8 shorter
than the prompt, GQA 4:2, vocab 520 holding boi 510, eoi 511 and the image token 519; eager
attention; every norm and the projector randomised).

With one and with two images (pixel values from g3export.runtimes.images on PIL images):
image features equal HF's get_image_features; prefill logits at every position equal HF's with
token_type_ids (HF's per-image bidirectional mask, GEMMA3_SPEC §3c); 20 greedy tokens equal HF's
generate, through our generation loop in one chunk and in chunks of 5 (the chunker keeps images
whole). Then the tests that prove the mask matters:

* causal-only image attention gives different logits, and those equal HF's without
  token_type_ids (so HF's bidirectional path is really in use when we compare with it);
* images that see each other (one block for all image tokens) give different logits; and changing
  the second image leaves every logit before it unchanged, in ours and in HF's.

Loading: transformers 5.23's save_pretrained writes the 4.x prefixes (`language_model.model.*`,
`vision_tower.*`, `multi_modal_projector.*`) but the vision tower WITHOUT the `vision_model.`
level that Hub checkpoints have (`vision_tower.vision_model.*`). If build_model does not read that
yet, `_load_ours` rewrites the file to Hub naming first (test_loader_reads_save_pretrained shows
which case holds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from g3export.modeling import text as text_module
from g3export.modeling.weights import build_model
from g3export.runtimes.generate import generate, prefill_chunks
from g3export.runtimes.reference import TorchSession

from tests.multimodal import (DECODE, IMG, MM, TINY, _hf_features, _hf_prefill,
                              _hub_named_copy, _prompt)
from tests.multimodal import models, pixels  # noqa: F401  (module-scoped fixtures)

ATOL, RTOL = 5e-5, 1e-4


def _ours_prefill(ours, ids, feats):
    caches = TorchSession(ours, 128).caches
    with torch.no_grad():
        logits, _ = ours(ids, torch.tensor([0]), caches, feats.reshape(-1, feats.shape[-1]))
    return logits[0]


def test_loader_reads_both_vision_namings(models):
    """build_model reads transformers 5.23's save_pretrained output as written, and the same
    weights in Hub naming (`vision_tower.vision_model.*`) give the same model."""
    hf, ours, path, loaded_directly = models
    assert loaded_directly, "build_model refused the save_pretrained checkpoint"
    hub = build_model(checkpoint=_hub_named_copy(path, path.parent / (path.name + "_hub")))
    a, b = ours.state_dict(), hub.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_image_features_match_hf(models, pixels):
    hf, ours, *_ = models
    with torch.no_grad():
        mine = ours.image_features(pixels)
    theirs = _hf_features(hf, pixels)
    assert mine.shape == theirs.shape == (3, MM, TINY.text.hidden_size)
    np.testing.assert_allclose(mine.numpy(), theirs.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_images", [1, 2])
def test_prefill_logits_and_greedy_tokens_match_hf(models, pixels, n_images):
    hf, ours, *_ = models
    pv = pixels[:n_images]
    ids = _prompt(n_images, seed=n_images)
    n = ids.shape[1]
    assert n > 3 * TINY.text.sliding_window
    with torch.no_grad():
        feats = ours.image_features(pv)
    np.testing.assert_allclose(_ours_prefill(ours, ids, feats).numpy(),
                               _hf_prefill(hf, ids, pv).numpy(), atol=ATOL, rtol=RTOL)

    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=pv, token_type_ids=(ids == IMG).long(),
                          max_new_tokens=DECODE, do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    hf_tokens = out.sequences[0, n:].tolist()
    assert len(hf_tokens) == DECODE
    for chunk in (512, 5):
        if chunk == 5:  # the chunker really splits the prompt, around (never inside) images
            chunks = prefill_chunks(ids[0].tolist(), chunk, IMG)
            assert len(chunks) > n_images + 2
            for s, e in chunks:
                img = (ids[0, s:e] == IMG).int()
                assert int(img.sum()) in (0, MM, 2 * MM)
        r = generate(TorchSession(ours, 128), ids[0].tolist(), DECODE, stop_ids=[],
                     chunk_size=chunk, image_features=feats.numpy())
        assert r.token_ids == hf_tokens, f"chunk_size {chunk}"
    # the first generated token's logits too (HF's are from its prefill with the image mask)
    session = TorchSession(ours, 128)
    first = None
    for s, e in prefill_chunks(ids[0].tolist(), 5, IMG):
        m = int((ids[0, s:e] == IMG).sum())
        before = int((ids[0, :s] == IMG).sum())
        f = feats.reshape(-1, feats.shape[-1])[before:before + m].numpy() if m else None
        first = session.forward(ids[:, s:e].numpy(), s, f)
    np.testing.assert_allclose(first[0], out.logits[0][0].numpy(), atol=ATOL, rtol=RTOL)


# -- the mask matters ----------------------------------------------------------------------------

def _with_groups(monkeypatch, fn):
    monkeypatch.setattr(text_module, "image_groups_from_ids", fn)


def _causal_only(ids, image_token_id):
    return torch.full_like(ids, -1)


def _one_block(ids, image_token_id):  # every image token in one block: images see each other
    return torch.where(ids == image_token_id, torch.zeros_like(ids), torch.full_like(ids, -1))


def _image_positions(ids):
    return torch.nonzero(ids[0] == IMG)[:, 0]


@pytest.mark.parametrize("n_images", [1, 2])
def test_causal_only_image_attention_differs(models, pixels, n_images, monkeypatch):
    hf, ours, *_ = models
    pv = pixels[:n_images]
    ids = _prompt(n_images, seed=10 + n_images)
    with torch.no_grad():
        feats = ours.image_features(pv)
    bidir = _ours_prefill(ours, ids, feats)
    hf_bidir = _hf_prefill(hf, ids, pv)
    hf_causal = _hf_prefill(hf, ids, pv, bidirectional=False)
    _with_groups(monkeypatch, _causal_only)
    causal = _ours_prefill(ours, ids, feats)

    np.testing.assert_allclose(bidir.numpy(), hf_bidir.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(causal.numpy(), hf_causal.numpy(), atol=ATOL, rtol=RTOL)
    # the image tokens before the last of each image, and all text after the first image, change
    first_img = int(_image_positions(ids)[0])
    diff = (bidir - causal).abs().amax(-1)
    assert float(diff[:first_img].max()) == 0.0
    assert float(diff[first_img]) > 1e-3
    assert float(diff[first_img + MM:].min()) > 1e-4
    assert float((hf_bidir - hf_causal).abs().amax(-1)[first_img]) > 1e-3


def test_images_do_not_see_each_other(models, pixels, monkeypatch):
    hf, ours, *_ = models
    ids = _prompt(2, seed=21)
    second = int(_image_positions(ids)[MM])  # first token of the second image
    pv = pixels[:2]
    pv_changed = torch.stack([pixels[0], pixels[2]])
    with torch.no_grad():
        feats = ours.image_features(pv)
        feats_changed = ours.image_features(pv_changed)

    a, b = _ours_prefill(ours, ids, feats), _ours_prefill(ours, ids, feats_changed)
    ha, hb = _hf_prefill(hf, ids, pv), _hf_prefill(hf, ids, pv_changed)
    np.testing.assert_allclose(a.numpy(), ha.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(b.numpy(), hb.numpy(), atol=ATOL, rtol=RTOL)
    # a different second image changes nothing before it (the first image does not see it) ...
    assert float((a[:second] - b[:second]).abs().max()) == 0.0
    assert float((ha[:second] - hb[:second]).abs().max()) == 0.0
    # ... and changes everything from it on
    assert float((a[second:] - b[second:]).abs().amax(-1).min()) > 1e-4

    _with_groups(monkeypatch, _one_block)
    joined, joined_b = _ours_prefill(ours, ids, feats), _ours_prefill(ours, ids, feats_changed)
    first = int(_image_positions(ids)[0])
    # with one block the first image sees the second: its logits depend on the second image
    assert float((joined[first:first + MM] - joined_b[first:first + MM]).abs().max()) > 1e-3
    assert float((joined - ha).abs().amax(-1)[first]) > 1e-3
