"""The command line on bad input: a clear one-line message, a non-zero exit, no traceback."""

import json

import pytest
from click.testing import CliRunner

from g3export.cli import main
from g3export.modeling.cache import kv_layout


def run(*args):
    r = CliRunner().invoke(main, list(args))
    assert "Traceback" not in r.output
    return r


def test_unknown_size_lists_the_valid_ones():
    r = run("run", "--reference", "--size", "7b", "--prompt", "hi")
    assert r.exit_code == 2 and "270m" in r.output and "27b" in r.output


def test_missing_checkpoint(tmp_path):
    r = run("run", "--reference", "--checkpoint", str(tmp_path / "nope"), "--prompt-ids", "2,3")
    assert r.exit_code == 1 and "Error:" in r.output and "nope" in r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)


def test_corrupt_checkpoint(tmp_path, hf_tiny_causal):
    _, good = hf_tiny_causal
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text((good / "config.json").read_text())
    shard = sorted(good.glob("*.safetensors"))[0]
    (bad / "model.safetensors").write_bytes(shard.read_bytes()[:100])
    r = run("run", "--reference", "--checkpoint", str(bad), "--prompt-ids", "2,3")
    assert r.exit_code == 1 and "Error:" in r.output
    (bad / "config.json").write_text("{not json")
    r = run("run", "--reference", "--checkpoint", str(bad), "--prompt-ids", "2,3")
    assert r.exit_code == 1 and "config.json" in r.output


def test_checkpoint_size_mismatch(hf_tiny_causal):
    _, path = hf_tiny_causal
    r = run("run", "--reference", "--size", "1b", "--checkpoint", str(path), "--prompt-ids", "2,3")
    assert r.exit_code == 1 and "1b" in r.output


def test_prompt_longer_than_context_and_ids_out_of_range(hf_tiny_causal):
    _, path = hf_tiny_causal
    ids = ",".join(["5"] * 30)
    r = run("run", "--reference", "--checkpoint", str(path), "--prompt-ids", ids, "--max-context", "16")
    assert r.exit_code == 1 and "30 tokens" in r.output and "16" in r.output
    r = run("run", "--reference", "--checkpoint", str(path), "--prompt-ids", "2,999999")
    assert r.exit_code == 1 and "out of range" in r.output


def test_reference_run_json(hf_tiny_causal):
    _, path = hf_tiny_causal
    r = run("run", "--reference", "--checkpoint", str(path), "--prompt-ids", "2,10,20,30",
            "--max-new-tokens", "5", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["prompt_token_ids"] == [2, 10, 20, 30] and len(out["token_ids"]) == 5


def test_plan_12b_memory_claim():
    r = run("plan", "--size", "12b", "--max-context", "131072", "--dtype", "bf16", "--json")
    p = json.loads(r.output)
    assert round(p["kv_bytes"] / 2**30, 1) == 8.3 and p["kv_bytes_all_global"] == 48 * 2**30
    r = run("plan", "--size", "1b", "--max-context", "65536")
    assert r.exit_code == 1 and "32768" in r.output


@pytest.fixture(scope="module")
def tiny_build(hf_tiny_causal, tmp_path_factory):
    _, path = hf_tiny_causal
    out = tmp_path_factory.mktemp("cli") / "tiny-onnx"
    r = run("build", "--checkpoint", str(path), "--target", "onnx", "--max-context", "64",
            "--out", str(out))
    assert r.exit_code == 0, r.output
    return out


def test_inspect_reports_components_and_kv_bytes(tiny_build, hf_tiny_causal):
    from g3export.modeling.config import load_hf_config

    _, path = hf_tiny_causal
    t = load_hf_config(path).text
    r = run("inspect", str(tiny_build))
    assert r.exit_code == 0, r.output
    assert "component text" in r.output and "past_key_0" in r.output
    m = json.loads(run("inspect", str(tiny_build), "--json").output)
    # 4 sliding layers of 8 slots + 2 full layers of 64 slots, K and V, fp32
    assert m["kv_layout"]["bytes"] == kv_layout(t, 64).bytes == 2 * 4 * 2 * 16 * (4 * 8 + 2 * 64)


def test_run_bench_verify_on_a_build(tiny_build, hf_tiny_causal):
    _, path = hf_tiny_causal
    args = ["--prompt-ids", ",".join(str(i) for i in range(3, 43)), "--max-new-tokens", "8", "--json"]
    compiled = json.loads(run("run", str(tiny_build), *args).output.strip().splitlines()[-1])
    ref = json.loads(run("run", "--reference", "--checkpoint", str(path), "--max-context", "64",
                         *args).output.strip().splitlines()[-1])
    assert compiled["token_ids"] == ref["token_ids"] and len(ref["token_ids"]) == 8
    b = json.loads(run("bench", str(tiny_build), "--prompt-len", "20", "--new-tokens", "4", "--json").output)
    assert b["kv_bytes"] > 0 and b["decode_tokens_per_s"] > 0 and b["prompt_len"] == 20
    r = run("verify", str(tiny_build))
    assert r.exit_code == 0, r.output


def test_run_refuses_an_altered_build(tiny_build, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_build, copy)
    data = copy / "text.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    r = run("run", str(copy), "--prompt-ids", "2,3")
    assert r.exit_code == 1 and "text.onnx.data" in r.output
