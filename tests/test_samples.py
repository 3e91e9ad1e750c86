"""The samples in samples/ run as a user runs them (subprocesses) on a tiny ONNX build.

The tiny HF checkpoint (conftest's hf_tiny_causal: Gemma3ForCausalLM, both layer types, window 8,
vocab 512) has no tokenizer, so one is made with `tokenizers`: a word-level vocabulary of 512
entries with Gemma's special tokens at Gemma's ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3,
<start_of_turn> 105, <end_of_turn> 106), so `--prompt` text and the chat template work. The build
is made with the CLI (`g3export build --checkpoint ... --target onnx`), which copies the
checkpoint's tokenizer.json into the build directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
MAX_CONTEXT = 64
SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>",
            106: "<end_of_turn>"}
WORDS = ("user model hello world the sea is blue what did i say sky green tell me a story about "
         "cats and dogs").split()


def write_word_tokenizer(path: Path, vocab_size: int = 512) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    words = iter(WORDS)
    for i in range(vocab_size):
        vocab[SPECIALS.get(i) or next(words, None) or f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS.values()])
    tok.save(str(path))


@pytest.fixture(scope="module")
def tiny_ckpt(hf_tiny_causal, tmp_path_factory) -> Path:
    _, src = hf_tiny_causal
    ck = tmp_path_factory.mktemp("ck") / "tiny"
    shutil.copytree(src, ck)
    write_word_tokenizer(ck / "tokenizer.json")
    return ck


@pytest.fixture(scope="module")
def tiny_build(tiny_ckpt, tmp_path_factory) -> Path:
    from click.testing import CliRunner

    from g3export.cli import main

    out = tmp_path_factory.mktemp("builds") / "tiny-onnx"
    r = CliRunner().invoke(main, ["build", "--checkpoint", str(tiny_ckpt), "--target", "onnx",
                                  "--max-context", str(MAX_CONTEXT), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "tokenizer.json").is_file()
    return out


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from g3export.modeling.weights import build_model
    from g3export.runtimes.reference import TorchSession
    from g3export.runtimes.tokenizer import Tokenizer

    model = build_model(checkpoint=str(tiny_ckpt))
    return TorchSession(model, MAX_CONTEXT), Tokenizer.from_checkpoint(tiny_ckpt)


def _greedy(reference, ids: list[int], n: int) -> list[int]:
    from g3export.runtimes.generate import generate

    return generate(reference[0], ids, n).token_ids


def _run(script: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SAMPLES / script), *args], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_generate_sample_equals_reference(tiny_build, reference):
    proc = _run("generate.py", str(tiny_build), "--prompt", "tell me a story about the sea",
                "--max-new-tokens", "20", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = reference[1]
    assert out["prompt_token_ids"] == tok.encode(tok.chat_prompt("tell me a story about the sea"),
                                                 add_bos=False)
    assert out["prompt_token_ids"][:3] == [2, 105, 4]  # <bos> <start_of_turn> user
    assert out["token_ids"] == _greedy(reference, out["prompt_token_ids"], 20)
    assert out["stop_reason"] in ("stop_token", "max_new_tokens")
    # plain text mode streams the same answer
    text = _run("generate.py", str(tiny_build), "--prompt", "tell me a story about the sea",
                "--max-new-tokens", "20")
    assert text.returncode == 0 and text.stdout.strip() == out["text"].strip()


def test_generate_sample_errors_cleanly(tiny_build, tmp_path):
    proc = _run("generate.py", str(tmp_path / "nope"), "--prompt", "hi")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    long = " ".join(["sea"] * (MAX_CONTEXT + 5))
    proc = _run("generate.py", str(tiny_build), "--prompt", long)
    assert proc.returncode == 2 and "context" in proc.stderr


def test_chat_sample_piped_multi_turn(tiny_build, reference):
    stdin = "hello world\n\nwhat did i say\n/exit\nnever read\n"
    proc = _run("chat.py", str(tiny_build), "--max-new-tokens", "8", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    parts = proc.stdout.split("\n\n")
    assert len(parts) == 3 and parts[2] == "", proc.stdout  # two answers, each + a blank line
    answers = [p.strip() for p in parts[:2]]
    # the second turn is generated over the whole conversation, answer 1 as the model's turn
    tok = reference[1]
    msgs = [{"role": "user", "content": "hello world"}]
    want1 = tok.decode(_greedy(reference, tok.encode(tok.apply_chat_template(msgs), add_bos=False), 8))
    assert answers[0] == want1.strip()
    msgs += [{"role": "assistant", "content": want1}, {"role": "user", "content": "what did i say"}]
    ids2 = tok.encode(tok.apply_chat_template(msgs), add_bos=False)
    assert answers[1] == tok.decode(_greedy(reference, ids2, 8)).strip()


def test_chat_sample_drops_old_turns(tiny_build):
    # every turn is ~20 tokens with its answer: the 64-token context overflows by the 4th turn
    stdin = "".join(f"tell me a story about the sea {i}\n" for i in range(5))
    proc = _run("chat.py", str(tiny_build), "--max-new-tokens", "6", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n\n") == 5
    assert "dropped the oldest turn" in proc.stderr


def test_batch_generate_sample(tiny_build, reference, tmp_path):
    prompts = tmp_path / "prompts.txt"
    long = " ".join(["sea"] * (MAX_CONTEXT + 5))
    prompts.write_text("hello world\nthe sky is blue\n\n" + long + "\ncats and dogs\n")
    out = tmp_path / "out.jsonl"
    proc = _run("batch_generate.py", str(tiny_build), str(prompts), "-o", str(out),
                "--max-new-tokens", "6")
    assert proc.returncode == 1  # one prompt failed (too long); the others ran
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 4, 5]
    assert "error" in recs[2] and "context" in recs[2]["error"]
    tok = reference[1]
    for r in (recs[0], recs[1], recs[3]):
        ids = tok.encode(tok.chat_prompt(r["prompt"]), add_bos=False)
        assert r["token_ids"] == _greedy(reference, ids, 6)
        assert r["text"] == tok.decode(r["token_ids"]).strip()
        assert r["stop_reason"] in ("stop_token", "max_new_tokens") and r["seconds"] >= 0


def test_describe_image_sample_refuses_text_only_build(tiny_build, tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(img)
    proc = _run("describe_image.py", str(tiny_build), str(img))
    assert proc.returncode != 0
    assert "vision" in proc.stderr


def test_client_streams_a_chat_from_a_real_server(tiny_build, tmp_path):
    """samples/client.py against `g3export triton-repo` + a real tritonserver on 127.0.0.1."""
    from g3export.serving.server import ServerError, find_tritonserver
    from tests.serve.conftest import assert_gone, start_server, tree

    try:
        install = find_tritonserver()
    except ServerError as e:
        pytest.skip(str(e))
    server = start_server(tiny_build, tmp_path / "repo", install, max_batch=2)
    procs = tree(server.proc.pid)
    try:
        client = [sys.executable, str(SAMPLES / "client.py"), "--url", server.url]
        r = subprocess.run([*client, "--max-tokens", "5", "--json"], capture_output=True,
                           text=True, input="hello world\nwhat did i say\n", timeout=120)
        assert r.returncode == 0, r.stderr
        turns = [json.loads(line) for line in r.stdout.splitlines()]
        assert len(turns) == 2 and all(1 <= len(t["output_ids"]) <= 5 for t in turns)
        r = subprocess.run([*client, "--prompt-ids", ",".join(["2"] * MAX_CONTEXT)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and "context" in r.stderr
    finally:
        server.stop()
    assert_gone(procs)
