"""Turning a user's text (and images) into prompt token ids.

    ids = build_prompt_ids(tokenizer, config, "Describe this image.", images=[1])
    check_prompt_image_tokens(ids, config, n_views=1)        # for --prompt-ids given as they are

* Chat (default): Gemma's chat template (GEMMA3_SPEC §4) renders the user turn and the generation
  prompt; `<bos>` comes from the template, once.
* Raw (chat_template=False): the text with `<bos>` added once.
* Images (GEMMA3_SPEC §3a, §3d), as transformers' Gemma3Processor expands them. `images` is
  `crops_per_image` from g3export.runtimes.images.prepare_images: one entry per image, the number
  of views (1, or 1 + crops with Pan & Scan). Each image is placed where the user's text writes
  `<start_of_image>` (the i-th marker is the i-th image), or, when the text has no marker, all
  images go before the text (what the chat template renders for
  `[{"type": "image"}, ..., {"type": "text", ...}]`, HF's usual message layout). The marker of an
  image with one view becomes

      "\\n\\n<start_of_image>" + mm_tokens_per_image x "<image_soft_token>" + "<end_of_image>\\n\\n"

  and of an image with crops

      "Here is the original image " + SEQ + " and here are some crops to help you see better "
      + " ".join(SEQ for each crop)

  (SEQ the sequence above). The ids are the tokenizer's encoding of that expanded text, with the
  config's boi / image / eoi ids placed directly: the text between them is encoded piece by piece,
  which is what the tokenizer does anyway (these are added tokens, split off before the text is
  tokenized), so the tokenizer needs no `<image_soft_token>` entry (a GGUF tokenizer has none).
* Errors are PromptError (a ValueError) saying what to change: images for a model without vision,
  a marker count that differs from the image count, image soft tokens typed in the text, and (for
  `--prompt-ids`) a count of image soft tokens that is not mm_tokens_per_image per image view, or
  a run of soft tokens that is not exactly one image.
"""

from __future__ import annotations

from typing import Sequence

from ..modeling.config import ModelConfig
from ..errors import UserError

BOI = "<start_of_image>"
EOI = "<end_of_image>"
IMAGE_SOFT_TOKEN = "<image_soft_token>"
PAN_AND_SCAN_PREFIX = "Here is the original image "
PAN_AND_SCAN_MIDDLE = " and here are some crops to help you see better "


class PromptError(UserError, ValueError):
    """A prompt that cannot be built or used as given; the message says what to change."""


def image_sequence(mm_tokens: int, boi: str = BOI, soft: str = IMAGE_SOFT_TOKEN, eoi: str = EOI) -> str:
    """The text one image view becomes (HF's `full_image_sequence`)."""
    return f"\n\n{boi}{soft * mm_tokens}{eoi}\n\n"


def image_text(views: int, mm_tokens: int, boi: str = BOI, soft: str = IMAGE_SOFT_TOKEN,
               eoi: str = EOI) -> str:
    """The text one image with `views` views (1 + Pan & Scan crops) becomes (HF's
    `replace_image_token`)."""
    if views < 1:
        raise PromptError(f"an image has at least one view, got {views}")
    seq = image_sequence(mm_tokens, boi, soft, eoi)
    if views == 1:
        return seq
    return PAN_AND_SCAN_PREFIX + seq + PAN_AND_SCAN_MIDDLE + " ".join([seq] * (views - 1))


def place_images(prompt: str, n_images: int) -> str:
    """The user's text with one `<start_of_image>` per image: kept where the text has them, else
    all images first. Raises PromptError when the text marks a different number of images."""
    marked = prompt.count(BOI)
    if marked == n_images:
        return prompt
    if marked == 0:
        return BOI * n_images + prompt
    raise PromptError(f"the prompt marks {marked} image place(s) with {BOI} but {n_images} "
                      f"image(s) were given; write one {BOI} per image, or none to put the "
                      "images before the text")


def expand_prompt_text(text: str, images: Sequence[int], mm_tokens: int) -> str:
    """The rendered prompt text with the i-th `<start_of_image>` replaced by image i's text: the
    string HF's Gemma3Processor tokenizes (used to check our ids against it)."""
    parts = text.split(BOI)
    if len(parts) - 1 != len(images):
        raise PromptError(f"{len(parts) - 1} {BOI} marker(s) for {len(images)} image(s)")
    out = [parts[0]]
    for views, rest in zip(images, parts[1:]):
        out += [image_text(views, mm_tokens), rest]
    return "".join(out)


def build_prompt_ids(tokenizer, config: ModelConfig, prompt: str, chat_template: bool = True,
                     images: Sequence[int] = (), n_images: int | None = None) -> list[int]:
    """Token ids of `prompt` (chat-rendered unless chat_template=False) with the images expanded.

    images: views per image (crops_per_image from prepare_images); [] for a text prompt.
    n_images: the older form, n images of one view each (same as images=[1] * n_images).
    """
    if n_images is not None:
        if images:
            raise TypeError("pass images or n_images, not both")
        images = [1] * n_images
    images = [int(v) for v in images]
    if images and not config.has_vision:
        raise PromptError(f"model {config.name} has no vision encoder and takes no images; drop "
                          "--image or use a model with vision (4b, 12b, 27b)")
    if IMAGE_SOFT_TOKEN in prompt or EOI in prompt:
        raise PromptError(f"the prompt contains {IMAGE_SOFT_TOKEN} or {EOI}; mark an image's "
                          f"place with {BOI} only (or pass --prompt-ids)")
    if images:
        prompt = place_images(prompt, len(images))
    elif BOI in prompt and config.has_vision:
        raise PromptError(f"the prompt marks {prompt.count(BOI)} image place(s) with {BOI} but no "
                          "image was given; pass --image PATH for each")
    text = tokenizer.chat_prompt(prompt) if chat_template else prompt
    if not images:
        return tokenizer.encode(text, add_bos=not chat_template)

    boi, soft, eoi, mm = (config.boi_token_id, config.image_token_id, config.eoi_token_id,
                          config.mm_tokens_per_image)
    parts = text.split(BOI)
    if len(parts) - 1 != len(images):  # the chat template changed the marker count (it does not)
        raise PromptError(f"the rendered prompt holds {len(parts) - 1} {BOI} for {len(images)} images")
    view_ids = [boi, *([soft] * mm), eoi]
    ids: list[int] = []
    pending = parts[0]  # text not yet encoded

    def flush(piece: str) -> None:
        ids.extend(tokenizer.encode(piece, add_bos=False) if piece else [])

    for views, rest in zip(images, parts[1:]):
        if views < 1:
            raise PromptError(f"an image has at least one view, got {views}")
        # the image's text split at its special tokens: text, [boi soft.. eoi], text, ...
        if views == 1:
            texts_between = ["\n\n"]
        else:
            texts_between = [PAN_AND_SCAN_PREFIX + "\n\n", "\n\n" + PAN_AND_SCAN_MIDDLE + "\n\n",
                             *(["\n\n \n\n"] * (views - 2))]
        for i, between in enumerate(texts_between):
            flush(pending + between if i == 0 else between)
            ids.extend(view_ids)
        pending = "\n\n" + rest
    flush(pending)
    if not chat_template:
        bos = tokenizer.token_to_id("<bos>") if hasattr(tokenizer, "token_to_id") else None
        bos = config.text.bos_token_id if bos is None else bos
        if not ids or ids[0] != bos:
            ids.insert(0, bos)
    check_prompt_image_tokens(ids, config, sum(images))
    return ids


def check_prompt_image_tokens(ids: Sequence[int], config: ModelConfig, n_views: int) -> None:
    """Check prompt ids against the images given: mm_tokens_per_image image soft tokens per image
    view, in runs of exactly one image each. Raises PromptError saying what does not match."""
    soft, mm = config.image_token_id, config.mm_tokens_per_image
    count = sum(1 for i in ids if i == soft)
    if not config.has_vision:
        if n_views:
            raise PromptError(f"model {config.name} has no vision encoder and takes no images; "
                              "drop --image")
        return
    if count != mm * n_views:
        have = f"{count} image soft token(s) (id {soft})"
        raise PromptError(
            f"the prompt ids hold {have} but {n_views} image view(s) were given, which need "
            f"{mm * n_views} ({mm} per view); put {mm} consecutive id-{soft} tokens, between "
            f"{config.boi_token_id} and {config.eoi_token_id}, in the ids for each image")
    run = 0
    for pos, i in enumerate([*ids, None]):
        if i == soft:
            run += 1
            continue
        if run and run != mm:
            raise PromptError(
                f"the prompt ids have a run of {run} image soft tokens ending at position {pos}; "
                f"each image needs exactly {mm} consecutive ones (separate images with "
                f"{config.eoi_token_id} / {config.boi_token_id})")
        run = 0
