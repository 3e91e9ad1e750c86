"""Gemma 3's tokenizer and chat template, over the `tokenizers` library.

Contract:

* `Tokenizer.from_checkpoint(path)` reads, in this order, `tokenizer.json` (the HF fast
  tokenizer), `tokenizer.model` (SentencePiece), or the metadata of a GGUF file
  (`tokenizer.ggml.tokens/scores/token_type`, model 'llama' = SentencePiece). A build directory
  stores `to_json()` as its tokenizer.json, read back with `from_json_file`.
* Gemma's SentencePiece vocabulary becomes a `tokenizers` BPE model the way transformers builds
  it (GemmaTokenizer; its GGUF builder): spaces are normalised to "▁" with no prefix space, BPE
  with byte fallback (`<0xNN>` pieces) and `<unk>`, merges recovered from the vocabulary (every
  split of a piece into two pieces, ranked by the piece's priority: its position in a GGUF file,
  its score in a .model file), control pieces as special added tokens, user-defined pieces ("\n",
  "\n\n", `<start_of_image>`, ...) as plain added tokens matched whole. Whitespace-only pieces
  that a GGUF spells with real spaces are respelled with "▁" first. The result tokenizes exactly
  like `AutoTokenizer.from_pretrained(dir, gguf_file=...)` (tests/runtimes/test_tokenizer.py).
* `encode(text, add_bos)` adds `<bos>` once (never a second one when the text starts with it);
  `decode(ids, skip_special_tokens=True)`; `StreamDecoder` turns ids into text pieces one id at a
  time, holding back bytes of an unfinished UTF-8 character.
* `apply_chat_template` is GEMMA3_SPEC §4's Jinja template in Python: a system message is
  prepended to the first user turn, 'assistant' is written 'model', content is a string or a list
  of {type: text | image} items (an image becomes `<start_of_image>`), and roles must alternate
  user / assistant (ValueError otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE
from ..errors import UserError

BOS, EOS, UNK = "<bos>", "<eos>", "<unk>"
START_OF_TURN, END_OF_TURN, START_OF_IMAGE = "<start_of_turn>", "<end_of_turn>", "<start_of_image>"

# SentencePiece piece types (sentencepiece_model.proto; llama.cpp's token_type uses the same numbers)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class TokenizerError(UserError, ValueError):
    """No usable tokenizer at a path; the message says what was looked for."""


# ---------------------------------------------------------------------------------------------
# Building Gemma's BPE tokenizer from a SentencePiece vocabulary


def _respell(token: str) -> str:
    """GGUF files keep whitespace-only pieces with real spaces; the BPE vocabulary needs '▁'."""
    return "\u2581" * len(token) if " " in token and not token.strip() else token


def _merges(tokens: Sequence[str], vocab: Mapping[str, int],
            rank: Sequence[float]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary, best-ranked piece first.

    Within one piece, longer left halves come first; ties are broken by the halves' ids.
    """
    found = []
    for index, piece in enumerate(tokens):
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                  if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((rank[index], -len(left), -len(right), left, right) for left, right in splits)
    found.sort(key=lambda m: m[:3])  # stable: equal keys keep their order
    return [(m[3], m[4]) for m in found]


def build_gemma_tokenizer(tokens: Sequence[str], token_types: Sequence[int],
                          rank: Sequence[float]) -> _Backend:
    """A `tokenizers.Tokenizer` for a Gemma SentencePiece vocabulary (module docstring).

    tokens       the pieces, index = id
    token_types  SentencePiece types per piece (3 control, 4 user-defined, 6 byte, ...)
    rank         merge priority per piece, lower merges first
    """
    # A respelled user-defined piece ("  " -> "▁▁") is an ordinary BPE piece, not an added token.
    user_defined = [t for t, kind in zip(tokens, token_types)
                    if kind == _USER_DEFINED and _respell(t) == t]
    tokens = [_respell(t) for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = _Backend(BPE(vocab=vocab, merges=_merges(tokens, vocab, rank), unk_token=UNK,
                           fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    return backend


def _from_gguf(path: Path) -> _Backend:
    from g3export.modeling.gguf import open_gguf

    md = open_gguf(path).metadata
    found = md.get("tokenizer.ggml.model")
    if found != "llama":
        raise TokenizerError(f"{path}: tokenizer.ggml.model is {found!r}; Gemma's is 'llama' "
                             "(SentencePiece)")
    tokens = md.get("tokenizer.ggml.tokens")
    types = md.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or not hasattr(types, "tolist") or len(types) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens / token_type are missing or of "
                             "different lengths; the GGUF is corrupt")
    types = types.tolist()
    # The position of a piece in the file is its merge priority (transformers' Gemma GGUF
    # builder: the scores do not follow the merge order).
    return build_gemma_tokenizer(tokens, types, rank=range(len(tokens)))


def _from_sentencepiece(path: Path) -> _Backend:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:
        raise TokenizerError(f"{path} is not a SentencePiece model ({e})") from None
    if proto.trainer_spec.model_type != 2:  # BPE
        raise TokenizerError(f"{path} is not a BPE SentencePiece model (Gemma's is)")
    pieces = list(proto.pieces)
    return build_gemma_tokenizer([p.piece for p in pieces], [p.type for p in pieces],
                                 rank=[-p.score for p in pieces])


# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Gemma 3 text <-> ids. Wraps a `tokenizers.Tokenizer`; never adds tokens implicitly."""

    def __init__(self, backend: _Backend):
        self.backend = backend
        self.bos_id = self._require(BOS)
        self.eos_id = self._require(EOS)

    def _require(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise TokenizerError(f"the tokenizer has no {token} token; is it Gemma's?")
        return i

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Tokenizer":
        """From tokenizer.json, else tokenizer.model, else the GGUF's metadata (file or the one
        .gguf in a directory)."""
        p = Path(path).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            return cls(_from_gguf(p))
        if p.is_file():
            p = p.parent
        if (p / "tokenizer.json").exists():
            return cls.from_json_file(p / "tokenizer.json")
        if (p / "tokenizer.model").exists():
            return cls(_from_sentencepiece(p / "tokenizer.model"))
        ggufs = sorted(p.glob("*.gguf")) if p.is_dir() else []
        if len(ggufs) == 1:
            return cls(_from_gguf(ggufs[0]))
        raise TokenizerError(f"no tokenizer at {p}: looked for tokenizer.json, tokenizer.model "
                             f"and a single .gguf file (found {len(ggufs)})")

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Tokenizer":
        try:
            return cls(_Backend.from_file(str(path)))
        except Exception as e:
            raise TokenizerError(f"{path} is not a readable tokenizer.json ({e})") from None

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what a build directory stores)."""
        return self.backend.to_str()

    # -- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; with add_bos, exactly one leading <bos> (kept if already there)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping],
                            add_generation_prompt: bool = True) -> str:
        return apply_chat_template(messages, add_generation_prompt)

    def chat_prompt(self, user_text: str, system: str | None = None) -> str:
        return chat_prompt(user_text, system)


class StreamDecoder:
    """Incremental decoding: `feed(id)` returns the text that id completes ('' while a multi-byte
    UTF-8 character is still incomplete); `flush()` returns whatever is left.

    Keeps a little context before the new ids, since a piece's text can depend on its neighbours
    (byte-fallback pieces combine into one character).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is context already emitted
        self.read = 0    # ids[read:] are not yet emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def feed(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


# ---------------------------------------------------------------------------------------------
# Chat template (GEMMA3_SPEC §4)


def _text_of(content) -> str:
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, (list, tuple)):
        parts = []
        for item in content:
            if item["type"] == "image":
                parts.append(START_OF_IMAGE)
            elif item["type"] == "text":
                parts.append(item["text"].strip())
        return "".join(parts)
    raise ValueError("Invalid content type")


def apply_chat_template(messages: Sequence[Mapping], add_generation_prompt: bool = True,
                        bos_token: str = BOS) -> str:
    """Gemma 3's chat template, rendered exactly as its Jinja source renders it."""
    if not messages:
        raise ValueError("no messages to render")
    first_user_prefix = ""
    if messages[0]["role"] == "system":
        system = messages[0]["content"]
        first_user_prefix = (system if isinstance(system, str) else system[0]["text"]) + "\n\n"
        messages = messages[1:]
    out = [bos_token]
    for i, message in enumerate(messages):
        if (message["role"] == "user") != (i % 2 == 0):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        role = "model" if message["role"] == "assistant" else message["role"]
        out.append(f"{START_OF_TURN}{role}\n{first_user_prefix if i == 0 else ''}")
        out.append(_text_of(message["content"]))
        out.append(f"{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)


def chat_prompt(user_text: str, system: str | None = None) -> str:
    """One user turn (with an optional system text) and the model's turn opened."""
    messages = [{"role": "user", "content": user_text}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return apply_chat_template(messages)
