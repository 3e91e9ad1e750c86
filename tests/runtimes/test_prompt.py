"""build_prompt_ids against transformers' Gemma3Processor: the same ids (and so the same
token_type_ids) for chat and raw prompts, images placed before the text or at `<start_of_image>`
markers, two images, Pan & Scan crops, and newlines next to an image (which merge into longer
newline pieces when the text is tokenized whole: encoding piece by piece must give the same ids).

The tokenizer is a tiny Gemma-style vocabulary (520 pieces: control tokens, byte fallback, a few
letters and merges, "\\n" / "\\n\\n" / "\\n\\n\\n\\n" as user-defined pieces, `<start_of_image>` 510,
`<end_of_image>` 511, `<image_soft_token>` 519, the ids of the 'tiny-vision' preset) built with
g3export's own Gemma BPE builder, wrapped for HF as a PreTrainedTokenizerFast with the image
tokens as extra special tokens. A check with the real Gemma 3 270M tokenizer (a GGUF, which has
no `<image_soft_token>`) runs when the embedded checkpoint is present.
"""

from __future__ import annotations

import string

import numpy as np
import pytest

from g3export.modeling.config import preset
from g3export.runtimes.images import prepare_images
from g3export.runtimes.prompt import (PromptError, build_prompt_ids, check_prompt_image_tokens,
                                      expand_prompt_text)
from g3export.runtimes.tokenizer import Tokenizer, build_gemma_tokenizer

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # noqa: E402

TINY = preset("tiny-vision")
IMG, MM = TINY.image_token_id, TINY.mm_tokens_per_image


def _tiny_pieces():
    pieces = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2)]
    pieces += [(f"<0x{i:02X}>", 6) for i in range(256)]
    pieces += [("\n", 4), ("\n\n", 4), ("\n\n\n\n", 4), ("<start_of_turn>", 3), ("<end_of_turn>", 3)]
    normal = list(string.ascii_letters + string.digits + ".,?!:'") + ["\u2581"]
    normal += ["\u2581the", "\u2581image", "Here", "\u2581is", "\u2581original", "\u2581crops",
               "er", "re", "he", "in", "an", "\u2581a", "\u2581and", "\u2581see"]
    pieces += [(t, 1) for t in normal]
    while len(pieces) < TINY.text.vocab_size:
        pieces.append((f"<unused{len(pieces)}>", 5))
    pieces[TINY.boi_token_id] = ("<start_of_image>", 4)
    pieces[TINY.eoi_token_id] = ("<end_of_image>", 4)
    pieces[IMG] = ("<image_soft_token>", 3)
    return pieces


@pytest.fixture(scope="module")
def tok():
    p = _tiny_pieces()
    return Tokenizer(build_gemma_tokenizer([a for a, _ in p], [b for _, b in p], rank=range(len(p))))


@pytest.fixture(scope="module")
def hf_processor(tok):
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>", add_bos_token=True, add_eos_token=False,  # as Gemma's HF tokenizer
        extra_special_tokens={"boi_token": "<start_of_image>",
                                                 "eoi_token": "<end_of_image>",
                                                 "image_token": "<image_soft_token>"})
    assert hf_tok.image_token_id == IMG and hf_tok.convert_tokens_to_ids("<start_of_image>") == TINY.boi_token_id
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3)
    return transformers.Gemma3Processor(image_processor=ip, tokenizer=hf_tok, image_seq_length=MM)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(0)
    out = {}
    for name, (h, w) in {"small": (40, 50), "wide": (400, 1000), "tall": (900, 300)}.items():
        out[name] = d / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out[name])
    return out


def _hf_ids(proc, text, paths, chat, pan_and_scan=False):
    imgs = [Image.open(p) for p in paths]
    out = proc(text=text, images=imgs or None, return_tensors="np", add_special_tokens=not chat,
               do_pan_and_scan=pan_and_scan)
    for i in imgs:
        i.close()
    ids = out["input_ids"][0].tolist()
    if imgs:
        assert out["token_type_ids"][0].tolist() == [int(i == IMG) for i in ids]
    return ids, out


CASES = [
    # (user text, the text HF's chat template gets from [image items..., text], images)
    ("Describe the image.", ["small"]),
    ("Compare <start_of_image> and <start_of_image> please.", ["small", "wide"]),
    ("Look:\n\n<start_of_image>\n\nthe end", ["small"]),
    ("<start_of_image>", ["small"]),
    ("", ["small", "tall"]),
    ("What is here?", []),
]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "raw"])
@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["plain", "pan_and_scan"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_ids_match_hf_processor(tok, hf_processor, pictures, chat, pan_and_scan, case):
    text, names = CASES[case]
    paths = [pictures[n] for n in names]
    pixels, views = prepare_images(paths, TINY, pan_and_scan=pan_and_scan)
    ours = build_prompt_ids(tok, TINY, text, chat_template=chat, images=views)

    # what HF gets: the text with one <start_of_image> per image (images first when unmarked),
    # rendered by the chat template as HF renders [{"type": "image"}..., {"type": "text"}]
    marked = text if "<start_of_image>" in text or not names else "<start_of_image>" * len(names) + text
    hf_text = tok.chat_prompt(marked) if chat else marked
    theirs, out = _hf_ids(hf_processor, hf_text, paths, chat, pan_and_scan)
    assert ours == theirs
    if names:
        assert out["pixel_values"].shape[0] == sum(views)  # (the processor drops num_crops)
        np.testing.assert_allclose(pixels, out["pixel_values"], atol=1e-6, rtol=0)
        # and the string we document is the one HF tokenizes
        assert tok.encode(expand_prompt_text(hf_text, views, MM), add_bos=not chat) == theirs
    assert ours.count(IMG) == MM * sum(views)
    assert ours[0] == tok.bos_id and ours[1] != tok.bos_id
    if pan_and_scan and "wide" in names:
        assert max(views) > 1


def test_n_images_shorthand(tok):
    assert (build_prompt_ids(tok, TINY, "hi", n_images=2)
            == build_prompt_ids(tok, TINY, "hi", images=[1, 1]))


def test_prompt_errors(tok):
    with pytest.raises(PromptError, match="marks 1 image place"):
        build_prompt_ids(tok, TINY, "a <start_of_image> b", images=[1, 1])
    with pytest.raises(PromptError, match="no image was given"):
        build_prompt_ids(tok, TINY, "a <start_of_image> b")
    with pytest.raises(PromptError, match="no vision encoder"):
        build_prompt_ids(tok, preset("tiny"), "hi", images=[1])
    with pytest.raises(PromptError, match="<image_soft_token>"):
        build_prompt_ids(tok, TINY, "hi <image_soft_token>", images=[1])


def test_check_prompt_image_tokens():
    ok = [2, 5, TINY.boi_token_id, *[IMG] * MM, TINY.eoi_token_id, 7, TINY.boi_token_id,
          *[IMG] * MM, TINY.eoi_token_id]
    check_prompt_image_tokens(ok, TINY, 2)
    check_prompt_image_tokens([2, 5, 6], TINY, 0)
    with pytest.raises(PromptError, match=r"hold 8 image soft token.*1 image view.*need 4"):
        check_prompt_image_tokens(ok, TINY, 1)
    with pytest.raises(PromptError, match="hold 0 image soft token"):
        check_prompt_image_tokens([2, 5], TINY, 1)
    with pytest.raises(PromptError, match="run of 8"):    # two images glued into one run
        check_prompt_image_tokens([2, *[IMG] * (2 * MM), 3], TINY, 2)
    with pytest.raises(PromptError, match="run of 3"):
        check_prompt_image_tokens([2, *[IMG] * 3, 3, *[IMG] * 5], TINY, 2)
    with pytest.raises(PromptError, match="no vision encoder"):
        check_prompt_image_tokens([2, 5], preset("tiny"), 1)


def test_real_gemma_tokenizer():
    """Gemma 3's own vocabulary (270M GGUF): "\\n\\n" is 108, boi 255999, eoi 256000, and the
    image soft token 262144 (absent from this tokenizer) is placed by id."""
    embedded = pytest.importorskip("g3export.modeling.embedded")
    try:
        path = embedded.embedded_gguf_path()
    except Exception as e:  # the package is optional
        pytest.skip(f"no embedded Gemma 3 270M checkpoint ({e})")
    tok = Tokenizer.from_checkpoint(path)
    cfg = preset("4b")
    assert tok.token_to_id("<start_of_image>") == cfg.boi_token_id == 255999
    ids = build_prompt_ids(tok, cfg, "Describe this image.", images=[1])
    b = ids.index(cfg.boi_token_id)
    # "user\n" + "\n\n" before the image is one 3-newline piece (109), as in HF's whole-text encoding
    assert ids[b - 1] == 109 and ids[b + 1:b + 1 + 256] == [262144] * 256
    assert ids[b + 257] == cfg.eoi_token_id == 256000 and ids[b + 258] == 108
    # the text around the image is what the tokenizer gives for the expanded template text
    head = tok.encode(tok.chat_prompt("<start_of_image>Describe this image.").split("<start_of_image>")[0]
                      + "\n\n", add_bos=False)
    assert ids[:b] == head
    tail = tok.encode("\n\nDescribe this image.<end_of_turn>\n<start_of_turn>model\n", add_bos=False)
    assert ids[b + 258:] == tail
