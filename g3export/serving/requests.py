"""One Triton generate request -> a scheduler Request (no Triton import: unit-testable).

Inputs, by name (Triton's generate extension; every one optional in config.pbtxt):
  text_input   BYTES [1]     text, through the chat template unless chat_template is false
  input_ids    INT64 [-1]    token ids used exactly as given (like `g3export run --prompt-ids`)
  chat_template BOOL [1]     default true
  image        BYTES [-1]    multimodal builds: each element an image file's bytes, base64-encoded
                             (PNG/JPEG/WebP/GIF/BMP). Not a path or a URL: a server must not read
                             its own disk or the network on a client's behalf; a value that looks
                             like a URL is refused with a message saying so.
  max_tokens   INT32 [1]     default: the model's `default_max_tokens` parameter
  temperature FP32, top_k INT32, top_p FP32, seed INT64 [1]
                             greedy unless one of temperature/top_k/top_p is given (like `run`)
Exactly one of text_input / input_ids. Every problem is RequestError (one line, says what to do).
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile

import numpy as np

from ..errors import UserError
from ..runtimes.sampling import SamplingConfig
from ..runtimes.scheduler import Request


class RequestError(UserError, ValueError):
    """A request the model cannot serve; the message goes back to the client."""


def _scalar(inputs: dict, name: str, kind):
    v = inputs.get(name)
    if v is None:
        return None
    flat = np.asarray(v).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold one value, got {flat.size}")
    return kind(flat[0])


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def sampling_of(inputs: dict) -> SamplingConfig:
    t = _scalar(inputs, "temperature", float)
    k = _scalar(inputs, "top_k", int)
    p = _scalar(inputs, "top_p", float)
    seed = _scalar(inputs, "seed", int)
    if t is None and k is None and p is None:
        return SamplingConfig(greedy=True)
    try:
        return SamplingConfig(greedy=False, temperature=1.0 if t is None else t, top_k=k or 0,
                              top_p=1.0 if p is None else p, seed=seed)
    except ValueError as e:
        raise RequestError(str(e).replace(" (use --greedy for argmax)",
                                          " (omit temperature/top_k/top_p for greedy)")) from None


def decode_images(values, cfg) -> tuple[np.ndarray | None, list[int]]:
    """Base64 image bytes -> (pixel values [N, 3, S, S], views per image) via runtimes.images."""
    from ..runtimes.images import prepare_images

    items = [] if values is None else list(np.asarray(values, dtype=object).reshape(-1))
    if not items:
        return None, []
    if not cfg.has_vision:
        raise RequestError(f"model {cfg.name} has no vision encoder; send no image")
    paths = []
    try:
        for i, item in enumerate(items):
            s = item if isinstance(item, bytes) else str(item).encode()
            if s.strip().lower().startswith((b"http://", b"https://", b"file:", b"/")):
                raise RequestError(f"image {i} is a URL or a path; send the image file's bytes, "
                                   "base64-encoded, in `image` (the server reads no URLs or paths)")
            try:
                raw = base64.b64decode(s, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(f"image {i} is not valid base64; send the file's bytes "
                                   "base64-encoded") from None
            fd, path = tempfile.mkstemp(prefix="g3export-image-")
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            paths.append(path)
        try:
            return prepare_images(paths, cfg)
        except UserError as e:  # ImageError names the temporary file: say "image i" instead
            msg = str(e)
            for i, p in enumerate(paths):
                msg = msg.replace(p, f"image {i}")
            raise RequestError(msg) from None
    finally:
        for p in paths:
            os.unlink(p)


def parse_request(inputs: dict, tokenizer, cfg, default_max_tokens: int, image_features=None):
    """-> scheduler Request. image_features(pixel values) -> features is called when the request
    holds images (the session's vision graph). See the module docstring."""
    from ..runtimes.prompt import build_prompt_ids, check_prompt_image_tokens

    text, ids = inputs.get("text_input"), inputs.get("input_ids")
    if (text is None) == (ids is None):
        raise RequestError("give exactly one of text_input (a string) or input_ids (token ids)")
    max_tokens = _scalar(inputs, "max_tokens", int)
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be >= 1, got {max_tokens}")
    sampling = sampling_of(inputs)
    pixels, views = decode_images(inputs.get("image"), cfg)
    if ids is not None:
        prompt = [int(i) for i in np.asarray(ids).reshape(-1)]
        if cfg.has_vision:
            check_prompt_image_tokens(prompt, cfg, sum(views))
    else:
        if tokenizer is None:
            raise RequestError("this build has no tokenizer; send input_ids instead of text_input")
        flat = np.asarray(text, dtype=object).reshape(-1)
        if flat.size != 1:
            raise RequestError(f"text_input must hold one string, got {flat.size}")
        chat = _scalar(inputs, "chat_template", bool)
        prompt = build_prompt_ids(tokenizer, cfg, _text(flat[0]),
                                  chat_template=True if chat is None else chat, images=views)
    feats = None
    if pixels is not None:
        if image_features is None:
            raise RequestError("images need the build's vision component")
        feats = image_features(pixels)
    return Request(prompt_ids=prompt, max_new_tokens=max_tokens, sampling=sampling,
                   image_features=feats)
