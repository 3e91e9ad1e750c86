"""Untrusted checkpoint files (issue 12/15): the GGUF parser checks every count against the file
before allocating, agrees with the `gguf` package's reader, refuses metadata of the wrong type;
a safetensors index cannot point outside its directory; only regular files are opened."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time

import numpy as np
import pytest
import torch

from g3export.modeling.gguf import open_gguf
from g3export.modeling.sources import CheckpointError
from g3export.modeling.weights import build_model, resolve_checkpoint

gguf = pytest.importorskip("gguf")


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def test_gguf_array_claiming_2_to_the_40_elements(tmp_path):
    for etype in (0, 8):  # uint8 elements, strings
        body = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("a") + struct.pack("<IIQ", 9, etype, 1 << 40)
        p = tmp_path / f"huge{etype}.gguf"
        p.write_bytes(body.ljust(65, b"\0"))
        assert p.stat().st_size == 65
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match="not a readable GGUF"):
            resolve_checkpoint(p)
        assert time.perf_counter() - t0 < 1.0


def test_gguf_counts_beyond_the_file(tmp_path):
    cases = {
        "kv": b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 50),
        "string": b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 60),
        "dims": b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + _s("t") + struct.pack("<I", 1 << 30),
        "version": b"GGUF" + struct.pack("<IQQ", 1 << 24, 0, 0),
    }
    for name, body in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(body.ljust(64, b"\0"))
        with pytest.raises(CheckpointError, match="not a readable GGUF"):
            resolve_checkpoint(p)


def _gguf_with(path, **overrides):
    """A metadata-only gemma3 GGUF (no tensors): the config keys, any replaced by `overrides`
    (a value of None drops the key; a str/int/float picks the writer's type)."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    keys = {"gemma3.context_length": 256, "gemma3.embedding_length": 64, "gemma3.block_count": 6,
            "gemma3.feed_forward_length": 128, "gemma3.attention.head_count": 4,
            "gemma3.attention.head_count_kv": 2, "gemma3.attention.key_length": 16}
    keys.update(overrides)
    for k, v in keys.items():
        if v is None:
            continue
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(512)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_metadata_of_the_wrong_type_names_the_key(tmp_path):
    p = _gguf_with(tmp_path / "a.gguf", **{"gemma3.embedding_length": "big"})
    with pytest.raises(CheckpointError, match="gemma3.embedding_length is 'big', not an integer"):
        resolve_checkpoint(p)
    p = _gguf_with(tmp_path / "b.gguf", **{"gemma3.attention.head_count": 0})
    with pytest.raises(CheckpointError, match="gemma3.attention.head_count is 0"):
        resolve_checkpoint(p)
    p = _gguf_with(tmp_path / "c.gguf", **{"gemma3.rope.freq_base": "x"})
    with pytest.raises(CheckpointError, match="gemma3.rope.freq_base is 'x', not a number"):
        resolve_checkpoint(p)
    assert resolve_checkpoint(_gguf_with(tmp_path / "ok.gguf"))[0].text.hidden_size == 64


def test_gguf_parser_agrees_with_gguf_reader(causal_gguf):
    """Every metadata value and tensor (name, shape, type, bytes) as gguf.GGUFReader reads it."""
    ours = open_gguf(causal_gguf)
    ref = gguf.GGUFReader(str(causal_gguf))
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for k, v in ours.metadata.items():
        want = ref.fields[k].contents()
        got = v.tolist() if isinstance(v, np.ndarray) else v
        assert got == want, k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.shape == tuple(int(n) for n in reversed(b.shape)) and a.tensor_type == b.tensor_type
        assert np.array_equal(a.data, b.data), a.name


def test_real_270m_opens_fast():
    from g3export.modeling.embedded import embedded_gguf_path

    try:
        path = embedded_gguf_path()
    except CheckpointError:
        pytest.skip("the embedded 270M GGUF package is not installed")
    from g3export.modeling import gguf as g

    g._cached.cache_clear()
    t0 = time.perf_counter()
    config, kind = resolve_checkpoint(path)
    assert time.perf_counter() - t0 < 3.0  # was 15-20 s with gguf.GGUFReader
    assert kind == "gguf" and config.text.vocab_size == 262144


@pytest.fixture(scope="module")
def causal_gguf(tmp_path_factory):
    from tests.modeling.test_weights import _write_gguf

    import transformers
    from tests.conftest import tiny_text_config

    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(tiny_text_config()).eval()
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf)


# --- safetensors -----------------------------------------------------------------------------


def _copy(hf_tiny_causal, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_tiny_causal[1], dst)
    return dst


def _index(d):
    p = d / "model.safetensors.index.json"
    return p, json.loads(p.read_text())


def test_index_that_is_not_a_mapping(hf_tiny_causal, tmp_path):
    d = _copy(hf_tiny_causal, tmp_path)
    p, idx = _index(d)
    idx["weight_map"] = list(idx["weight_map"].items())
    p.write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="weight_map is not a mapping"):
        build_model(checkpoint=d)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/etc/passwd", "link"])
def test_index_naming_a_shard_outside_the_directory(hf_tiny_causal, tmp_path, escape):
    d = _copy(hf_tiny_causal, tmp_path)
    p, idx = _index(d)
    key = next(iter(idx["weight_map"]))
    shard = idx["weight_map"][key]
    if escape == "link":  # a symlink inside the directory that leads out of it
        outside = tmp_path / "elsewhere.safetensors"
        shutil.copy(d / shard, outside)
        os.symlink(outside, d / "link")
    else:
        (tmp_path / "outside.safetensors").write_bytes((d / shard).read_bytes())
    idx["weight_map"][key] = escape
    p.write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=f"names shard '{escape}', which is outside"):
        build_model(checkpoint=d)


@pytest.mark.parametrize("which", ["config.json", "shard"])
def test_a_fifo_is_refused_not_opened(hf_tiny_causal, tmp_path, which):
    d = _copy(hf_tiny_causal, tmp_path)
    if which == "config.json":
        target = d / "config.json"
    else:
        target = d / _index(d)[1]["weight_map"]["model.norm.weight"]
    target.unlink()
    os.mkfifo(target)

    def hang(*_):
        raise TimeoutError("opening the checkpoint blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        with pytest.raises(CheckpointError, match="is not a regular file"):
            build_model(checkpoint=d)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
