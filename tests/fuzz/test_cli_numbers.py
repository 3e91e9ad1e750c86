"""CLI numbers and text that mean nothing (issue 15, class "tracebacks"): each is a one-line usage
error (exit 2) or a one-line error (exit 1), never a traceback, NaN tokens or an ignored option.
On main every `run` case below except --max-new-tokens was a traceback (SamplingConfig's
ValueError, or numpy's on NaN probabilities) or was accepted."""

from __future__ import annotations

import time

import numpy as np
import pytest

from g3export.runtimes.sampling import Sampler, SamplingConfig, SamplingError

from .conftest import assert_refused, cli, invoke

REF = ["run", "--reference", "--size", "tiny", "--weights", "random", "--prompt-ids", "2,10,20"]

BAD_RUN_OPTIONS = [  # each a traceback or accepted on main
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-inf"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "2"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-p", "-0.5"], "--top-p"),
    (["--top-k", "99999999999"], "--top-k"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(1 << 70)], "--seed"),
    (["--max-new-tokens", str(10**30)], "--max-new-tokens"),
    (["--max-context", str(10**30)], "--max-context"),
] + [  # guards: already refused on main, kept so they stay refused
    (["--temperature", "abc"], "--temperature"),
    (["--top-k", "-1"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--max-context", "0"], "--max-context"),
    (["--max-context", "-5"], "--max-context"),
]


@pytest.mark.parametrize("extra,word", BAD_RUN_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_run_option_out_of_range(extra, word):
    t0 = time.monotonic()
    assert_refused(invoke(*REF, *extra), word, code=2)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("extra", [["--max-context", "100000"]])
def test_reference_context_beyond_the_model(extra):
    """tiny's maximum is 256. A guard: main refused it too (in kv_layout, after loading)."""
    assert_refused(invoke(*REF, *extra), "256")


@pytest.mark.parametrize("args,word", [  # guards except --max-batch 10**9 (accepted on main)
    (["build", "--size", "tiny", "--weights", "random", "--max-context", "0"], "--max-context"),
    (["build", "--size", "tiny", "--weights", "random", "--max-context", "100000"], "256"),
    (["build", "--size", "tiny", "--target", "trt", "--max-batch", "0"], "--max-batch"),
    (["build", "--size", "tiny", "--target", "trt", "--max-batch", str(10**9)], "--max-batch"),
    (["build", "--size", "tiny", "--target", "trt", "--prefill-chunk", "0"], "--prefill-chunk"),
    (["build", "--size", "tiny", "--target", "trt", "--prefill-chunk", "-3"], "--prefill-chunk"),
    (["plan", "--size", "tiny", "--max-context", "-1"], "--max-context"),
    (["plan", "--size", "tiny", "--batch", "0"], "--batch"),
], ids=lambda v: " ".join(v[1:]) if isinstance(v, list) else None)
def test_build_and_plan_numbers(args, word, tmp_path):
    r = invoke(*args, "--out", tmp_path / "o") if args[0] == "build" else invoke(*args)
    assert_refused(r, word)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,words", [
    (["--prompt-len", "100000"], ["--prompt-len", "max_context"]),   # main: ValueError traceback
    (["--prompt-len", "60", "--new-tokens", "10"], ["64"]),
    (["--prompt-len", "0"], ["--prompt-len"]),                       # guards from here
    (["--new-tokens", "1"], ["--new-tokens"]),
    (["--repeat", "0"], ["--repeat"]),
    (["--repeat", str(10**9)], ["--repeat"]),
])
def test_bench_options(tiny_build, args, words):
    assert_refused(invoke("bench", tiny_build, *args), *words)


def test_run_build_refuses_max_context(tiny_build):
    """main accepted --max-context for a build and ignored it."""
    assert_refused(invoke("run", tiny_build, "--prompt-ids", "2,3", "--max-context", "32"),
                   "--max-context", "rebuild", code=2)


def test_run_build_prompt_too_long_says_rebuild(tiny_build):
    """main said 'use a larger --max-context', an option a build does not take."""
    line = assert_refused(invoke("run", tiny_build, "--prompt-ids", ",".join(["5"] * 70)),
                          "70 tokens", "rebuild")
    assert "use a larger --max-context" not in line


def test_invalid_utf8_prompt():
    """Bytes that are not UTF-8 in --prompt (click hands them on as lone surrogates; main: a
    traceback from the tokenizer). A fresh process, since only real argv carries raw bytes."""
    r = cli("run", "--reference", "--size", "270m", "--prompt", b"caf\xe9 \xff".decode(
        "utf-8", "surrogateescape"), timeout=60)
    assert_refused(r, "--prompt", "UTF-8", code=2)


def test_tokenizer_refuses_surrogates():
    """The library's own guard (the CLI refuses earlier); checked before the backend is used, so
    a stand-in backend that would fail the test if reached is enough (no 262k-piece tokenizer)."""
    from types import SimpleNamespace

    from g3export.runtimes.tokenizer import Tokenizer, TokenizerError

    tok = SimpleNamespace(backend=None, bos_id=2)
    with pytest.raises(TokenizerError, match="UTF-8"):
        Tokenizer.encode(tok, "caf\udce9")


def test_denormal_temperature_is_argmax():
    """A denormal temperature: logits / 1e-320 overflow to inf and inf - inf is NaN, so main's
    sampler raised 'probabilities contain NaN'. Shifting by the maximum first keeps it exact:
    at such a temperature sampling is argmax."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 512)).astype(np.float32) * 30
    for t in (1e-320, 5e-324, 1e-300, 1e-30):
        s = Sampler(SamplingConfig(greedy=False, temperature=t, top_k=50, top_p=0.9, seed=1))
        assert (s(logits) == logits.argmax(-1)).all(), t
    s = Sampler(SamplingConfig(greedy=False, temperature=1e300, seed=1))
    assert s(logits).shape == (3,)  # flat but finite


def test_denormal_temperature_cli_matches_greedy():
    greedy = invoke(*REF, "--max-new-tokens", "6", "--greedy")
    cold = invoke(*REF, "--max-new-tokens", "6", "--temperature", "1e-320", "--seed", "3")
    assert greedy.exit_code == 0 and cold.exit_code == 0, (greedy.output, cold.output)
    assert greedy.stdout.strip().splitlines()[-1] == cold.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("kw", [dict(temperature=float("nan")), dict(temperature=0.0),
                                dict(temperature=float("inf")), dict(top_p=float("nan")),
                                dict(top_p=0.0), dict(top_k=-1), dict(seed=-1)])
def test_sampling_config_refuses(kw):
    """A SamplingError is a UserError (main: a plain ValueError, a traceback in the CLI; main
    accepted temperature nan/inf and seed -1)."""
    with pytest.raises(SamplingError):
        SamplingConfig(greedy=False, **kw)


def test_debug_shows_the_traceback(tmp_path):
    """--debug: the same error with its traceback (for bug reports)."""
    missing = tmp_path / "nope"
    r = cli("--debug", "inspect", missing, timeout=60)
    assert r.returncode != 0 and b"Traceback" in r.stderr and b"BuildError" in r.stderr
    assert_refused(cli("inspect", missing, timeout=60), "nope")
