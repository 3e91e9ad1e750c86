"""Tokenizer and chat template (g3export.runtimes.tokenizer).

* The chat template in Python renders exactly what GEMMA3_SPEC §4's Jinja source renders.
* The tokenizer built from the real Gemma 3 270M GGUF: fixed ids of the spec, bos handling,
  tokenizer.json round trip, streaming decode of byte-fallback characters, and (slow) identical
  ids to transformers' tokenizer loaded from the same GGUF.
* A SentencePiece `tokenizer.model` (trained here, tiny, BPE with byte fallback like Gemma's)
  converts to the same ids as SentencePiece itself.
"""

from __future__ import annotations

import pytest

from g3export.runtimes.tokenizer import StreamDecoder, Tokenizer, apply_chat_template, chat_prompt

# GEMMA3_SPEC §4, verbatim.
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}{{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}
        {%- endfor -%}
    {%- else -%}{{ raise_exception("Invalid content type") }}{%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Why is the sky blue?\n"}],
    [{"role": "system", "content": [{"type": "text", "text": "List system"}]},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe. "}]},
     {"role": "assistant", "content": "A cat.\n\n"},
     {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image"},
                                  {"type": "text", "text": "this?"}]}],
    [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "héllo\t\n 世界 🤖"}],
]


def _jinja(messages, add_generation_prompt):
    jinja2 = pytest.importorskip("jinja2")

    def raise_exception(msg):
        raise ValueError(msg)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_jinja(index, gen):
    messages = CONVERSATIONS[index]
    assert apply_chat_template(messages, add_generation_prompt=gen) == _jinja(messages, gen)


def test_chat_template_alternation():
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="alternate"):
        _jinja(bad, True)
    with pytest.raises(ValueError, match="alternate"):
        apply_chat_template(bad)
    with pytest.raises(ValueError, match="alternate"):
        apply_chat_template([{"role": "assistant", "content": "a"}])


def test_chat_prompt_spec_rendering():
    assert chat_prompt("Hi", system="Sys") == (
        "<bos><start_of_turn>user\nSys\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert chat_prompt("Hi") == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


# --- the real Gemma 3 tokenizer, from the 270M GGUF ----------------------------------------

TEXTS = [
    "Hello world",
    "  leading spaces and   runs    of      spaces ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows",
    "数字 12345 678.9 1,000,000",
    "emoji 🤖🚀👩‍👩‍👧 and accents éàü ñ",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "\u00a0nbsp \u200b zwsp \U00012000 cuneiform",
    "code: def f(x):\n    return x**2  # comment\n",
    "<start_of_image> a picture <end_of_image>",
    "",
]


@pytest.fixture(scope="module")
def gguf_path():
    from g3export.modeling.embedded import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="module")
def tok(gguf_path):
    return Tokenizer.from_checkpoint(gguf_path)


def test_spec_ids(tok):
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    for token, i in [("<pad>", 0), ("<unk>", 3), ("<mask>", 4), ("<start_of_turn>", 105),
                     ("<end_of_turn>", 106), ("<start_of_image>", 255999), ("<end_of_image>", 256000)]:
        assert tok.token_to_id(token) == i
    assert tok.encode("\n\n", add_bos=False) == [108]
    assert tok.vocab_size == 262144
    prompt = chat_prompt("Hi")
    ids = tok.encode(prompt, add_bos=True)
    assert ids[:3] == [2, 105, 2364] and ids.count(2) == 1  # <bos> of the template is not doubled
    assert ids[-3:] == [105, 4368, 107]  # <start_of_turn> model \n


def test_bos(tok):
    assert tok.encode("hi", add_bos=True)[0] == 2
    assert 2 not in tok.encode("hi", add_bos=False)
    assert tok.encode("<bos>hi", add_bos=True) == tok.encode("hi", add_bos=True)
    assert tok.encode("", add_bos=True) == [2]


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok, text):
    ids = tok.encode(text, add_bos=True)
    keep = text.replace("<start_of_turn>", "").replace("<end_of_turn>", "")
    assert tok.decode(ids) == keep
    assert tok.decode(ids, skip_special_tokens=False).startswith("<bos>")


def test_json_roundtrip(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    again = Tokenizer.from_json_file(tmp_path / "tokenizer.json")
    same_dir = Tokenizer.from_checkpoint(tmp_path)
    for text in TEXTS:
        assert again.encode(text, add_bos=True) == tok.encode(text, add_bos=True)
        assert same_dir.encode(text, add_bos=False) == tok.encode(text, add_bos=False)


def test_stream_decoder(tok):
    text = "Bytes: \U00012031\U0001208c é 🤖 世界 \U000F0000 done"
    ids = tok.encode(text, add_bos=True)
    assert any(tok.id_to_token(i).startswith("<0x") for i in ids)  # byte fallback exercised
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # really incremental


@pytest.mark.slow
def test_matches_transformers_gguf_tokenizer(tok, gguf_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in TEXTS + [apply_chat_template(c) for c in CONVERSATIONS]:
        # transformers adds a second <bos> to text that starts with one; we never do
        expected = hf.encode(text)
        if text.startswith("<bos>"):
            expected = expected[1:]
        assert tok.encode(text, add_bos=True) == expected, text
        assert tok.decode(expected) == hf.decode(expected, skip_special_tokens=True)


# --- a SentencePiece tokenizer.model ---------------------------------------------------------


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    lines = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(300)]
    lines += ["sentencepiece makes pieces from text", "Gemma tokenizes with byte fallback"] * 20
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=False, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["<start_of_turn>"], bos_piece="<bos>", eos_piece="<eos>",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", minloglevel=2)
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ours = Tokenizer.from_checkpoint(tmp_path)
    for text in ["the quick brown fox", "lazy dog 12345", "pieces from text",
                 "unseen wörds ü", "the  fox"]:
        assert ours.encode(text, add_bos=False) == ref.encode(text), text
        assert ours.decode(ours.encode(text, add_bos=True)) == text
