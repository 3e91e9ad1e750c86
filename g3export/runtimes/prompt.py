"""Turning a user's text (and images) into prompt token ids.

* Chat (default): Gemma's chat template (GEMMA3_SPEC §4) renders the user turn and the generation
  prompt; `<bos>` comes from the template, once.
* Raw (--no-chat-template): the text with `<bos>` added once.
* Images (GEMMA3_SPEC §3a): each `<start_of_image>` in the rendered prompt becomes
  "\\n\\n<start_of_image>" + mm_tokens_per_image image soft tokens + "<end_of_image>\\n\\n", exactly
  the text HF's processor tokenizes. In a chat prompt an image goes where the user's text puts
  `<start_of_image>`, or before the text when it does not.
"""

from __future__ import annotations

from ..modeling.config import ModelConfig

BOI = "<start_of_image>"


def build_prompt_ids(tokenizer, config: ModelConfig, prompt: str, chat_template: bool = True,
                     n_images: int = 0) -> list[int]:
    marked = prompt.count(BOI)
    if n_images and marked not in (0, n_images):
        raise ValueError(f"the prompt marks {marked} image places with {BOI} but {n_images} "
                         "image(s) were given")
    if n_images and not marked:
        prompt = BOI * n_images + prompt
    text = tokenizer.chat_prompt(prompt) if chat_template else prompt
    if n_images:
        soft = tokenizer.id_to_token(config.image_token_id)
        eoi = tokenizer.id_to_token(config.eoi_token_id)
        boi = tokenizer.id_to_token(config.boi_token_id)
        if soft is None or eoi is None or boi is None:
            raise ValueError("this tokenizer has no image tokens; use --prompt-ids")
        text = text.replace(BOI, f"\n\n{boi}{soft * config.mm_tokens_per_image}{eoi}\n\n")
    return tokenizer.encode(text, add_bos=not chat_template)
