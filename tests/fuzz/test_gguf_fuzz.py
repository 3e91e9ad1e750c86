"""GGUF files from someone else (issue 15 item 6): property tests that mutate a small valid Gemma 3
GGUF and check that g3export either reads it or refuses it with its own CheckpointError, never
another exception, quickly and without unbounded memory. The table-driven cases (2^40-element
arrays, counts past the file, wrong-typed keys) live in tests/modeling/test_sources.py; here the
mutations are random: bytes of the header and metadata, truncations, and typed rewrites of the
config keys `gguf_config` reads."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from g3export.modeling import gguf as g3gguf
from g3export.modeling.config import ModelConfig
from g3export.modeling.gguf import GGUFSource, gguf_config, open_gguf
from g3export.modeling.sources import CheckpointError

from .conftest import assert_refused, cli

gguf = pytest.importorskip("gguf")
VT = gguf.GGUFValueType

TIME_LIMIT = 5.0          # seconds per example (generous: the machine is shared and noisy)
RSS_LIMIT = 200 << 20     # bytes the peak RSS may grow by over the whole module
SCALE = int(os.environ.get("G3_FUZZ_SCALE", "1"))  # more examples for a deeper local run

# the config keys of a tiny Gemma 3 (the `tiny` preset's sizes), with the writer's type
BASE_KEYS = {
    "gemma3.context_length": (256, VT.UINT32), "gemma3.embedding_length": (64, VT.UINT32),
    "gemma3.block_count": (6, VT.UINT32), "gemma3.feed_forward_length": (128, VT.UINT32),
    "gemma3.attention.head_count": (4, VT.UINT32),
    "gemma3.attention.head_count_kv": (2, VT.UINT32),
    "gemma3.attention.key_length": (16, VT.UINT32),
    "gemma3.attention.value_length": (16, VT.UINT32),
    "gemma3.attention.layer_norm_rms_epsilon": (1e-6, VT.FLOAT32),
    "gemma3.rope.freq_base": (1e6, VT.FLOAT32), "gemma3.rope.scaling.type": ("linear", VT.STRING),
    "gemma3.rope.scaling.factor": (8.0, VT.FLOAT32),
    "gemma3.attention.sliding_window": (8, VT.UINT32),
    "tokenizer.ggml.model": ("llama", VT.STRING), "tokenizer.ggml.bos_token_id": (2, VT.UINT32),
    "tokenizer.ggml.eos_token_id": (1, VT.UINT32),
    "tokenizer.ggml.padding_token_id": (0, VT.UINT32),
}
VOCAB = 64


def _tensors():
    """A few small tensors with llama.cpp names: F32 norms and embedding, one Q8_0 matrix."""
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    down = rng.standard_normal((64, 128), dtype=np.float32)
    q = quantize(down, gguf.GGMLQuantizationType.Q8_0)
    return [("token_embd.weight", rng.standard_normal((VOCAB, 64), dtype=np.float32), None),
            ("blk.0.attn_norm.weight", np.ones(64, np.float32), None),
            ("blk.0.ffn_down.weight", q, gguf.GGMLQuantizationType.Q8_0),
            ("output_norm.weight", np.ones(64, np.float32), None)]


def write_gguf(path, overrides=None, tokens=None):
    """A small gemma3 GGUF. `overrides` maps key -> (value, GGUFValueType[, sub_type]) or None
    (drop the key); `tokens` replaces the token list."""
    keys = {**BASE_KEYS, **(overrides or {})}
    w = gguf.GGUFWriter(str(path), "gemma3")
    for k, v in keys.items():
        if v is not None:
            w.add_key_value(k, *v)
    if "tokenizer.ggml.tokens" not in keys:
        w.add_token_list(tokens if tokens is not None else [f"t{i}" for i in range(VOCAB)])
    for name, x, qtype in _tensors():
        if qtype is None:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, x, raw_shape=x.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_all(path):
    """What a build does with a GGUF: open it, read its config, then every tensor through
    GGUFSource.blocks (dequantized per row block, each block checked). Returns the config."""
    g3gguf._cached.cache_clear()  # the same path is rewritten per example
    g = open_gguf(path)
    cfg = gguf_config(g)
    src = GGUFSource(path)
    for name in src.tensors():
        for _, block in src.blocks(name, max_bytes=4096):
            assert block.is_floating_point()
    return cfg


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """The unmutated file, its bytes, and where its tensor data starts."""
    path = write_gguf(tmp_path_factory.mktemp("gguf_fuzz") / "tiny.gguf")
    g3gguf._cached.cache_clear()
    g = open_gguf(path)
    return path, path.read_bytes(), min(t.offset for t in g.tensors)


@pytest.fixture(scope="module")
def rss_guard():
    """Peak RSS (ru_maxrss, KiB on Linux) must not grow by more than RSS_LIMIT over the module."""
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start < RSS_LIMIT


def test_unmutated_file_reads(valid, rss_guard):
    """The base file opens, gives the tiny config, and every tensor reads back (norms shifted
    by llama.cpp's 1 + w back to 0)."""
    path, _, data_start = valid
    cfg = read_all(path)
    assert isinstance(cfg, ModelConfig)
    t = cfg.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.head_dim, t.vocab_size) == (64, 6, 4, 2, 16, VOCAB)
    src = GGUFSource(path)
    assert src.read("language_model.norm.weight").abs().max().item() == 0.0
    assert 0 < data_start < path.stat().st_size


# --- property A: bytes ---------------------------------------------------------------------------

U64S = [0, 1, 2, 8, 9, 12, 0xFF, 1 << 31, 1 << 32, (1 << 32) - 1, 1 << 40, 1 << 62, 1 << 63,
        (1 << 64) - 1]


def _byte_mutations(header_len: int, size: int):
    pos = st.integers(0, header_len - 1)
    one = st.one_of(
        st.tuples(st.just("byte"), pos, st.integers(0, 255)),
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("u32"), pos, st.sampled_from([v for v in U64S if v < 1 << 32])),
        st.tuples(st.just("u64"), pos, st.sampled_from(U64S)))
    return st.tuples(st.lists(one, min_size=0, max_size=6),
                     st.none() | st.integers(0, size))


def _mutate(data: bytes, edits, truncate) -> bytes:
    b = bytearray(data)
    for op, pos, v in edits:
        if op == "byte":
            b[pos] = v
        elif op == "flip":
            b[pos] ^= 1 << v
        else:
            fmt = "<I" if op == "u32" else "<Q"
            n = struct.calcsize(fmt)
            b[pos:pos + n] = struct.pack(fmt, v)[:len(b) - pos]
    return bytes(b if truncate is None else b[:truncate])


@contextlib.contextmanager
def _alarm(seconds: float):
    """Turn a hang into a failing example (TimeoutError) instead of a stuck test run."""
    def fire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _read_or_refused(path):
    t0 = time.monotonic()
    try:
        with _alarm(4 * TIME_LIMIT):
            read_all(path)
    except CheckpointError as e:
        assert "\n" not in str(e), str(e)
    finally:  # a time limit per example, not hypothesis' deadline (flaky under load)
        assert time.monotonic() - t0 < TIME_LIMIT


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # dequantizing garbage
def test_mutated_bytes_are_read_or_refused(valid, rss_guard, tmp_path_factory):
    """Random byte overwrites, bit flips and u32/u64 counts written anywhere in the header and
    metadata, and truncation at any length: opening the file, reading its config and reading every
    tensor as a build does either succeeds or raises CheckpointError (one line), never another
    exception, within TIME_LIMIT per example and RSS_LIMIT of peak memory growth."""
    path, data, data_start = valid
    out = tmp_path_factory.mktemp("bytes") / "m.gguf"

    @settings(max_examples=150 * SCALE, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_byte_mutations(data_start, len(data)))
    def prop(mutation):
        out.write_bytes(_mutate(data, *mutation))
        _read_or_refused(out)
        assert rss_guard(), "peak RSS grew by more than RSS_LIMIT"

    prop()


def _tensor_fields(data: bytes):
    """(name, offset of n_dims, n_dims) of each tensor info, read from the unmutated bytes."""
    g3gguf._cached.cache_clear()
    out = []
    for name, *_ in _tensors():
        nb = name.encode()
        i = data.index(struct.pack("<Q", len(nb)) + nb) + 8 + len(nb)
        out.append((name, i, struct.unpack_from("<I", data, i)[0]))
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # dequantizing garbage
def test_mutated_tensor_infos_are_read_or_refused(valid, rss_guard, tmp_path_factory):
    """A tensor info's n_dims, one of its dims, its ggml type or its data offset set to an
    interesting value (0, 1, odd sizes, 2^32, 2^40, 2^63, 2^64-1, every ggml type code): read or
    a one-line CheckpointError, within TIME_LIMIT. Found: a zero dim made the tensor 0 bytes, so
    (2^40, 0) passed the size check and GGUFSource looped 2^28 empty row blocks (a hang)."""
    path, data, _ = valid
    fields = _tensor_fields(data)
    out = tmp_path_factory.mktemp("infos") / "i.gguf"
    values = st.sampled_from(U64S + [3, 16, 31, 32, 33, 63, 64, 65, 128, 4096]) | st.integers(0, 40)

    @settings(max_examples=150 * SCALE, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.integers(0, len(fields) - 1),
                              st.sampled_from(["n_dims", "dim0", "dim1", "type", "offset"]),
                              values), min_size=1, max_size=3))
    def prop(edits):
        b = bytearray(data)
        for t, field, v in edits:
            _, i, n_dims = fields[t]
            if field == "n_dims":
                b[i:i + 4] = struct.pack("<I", v & 0xFFFFFFFF)
                continue
            if field.startswith("dim"):
                k = int(field[3])
                if k >= n_dims:
                    continue
                at, fmt = i + 4 + 8 * k, "<Q"
            elif field == "type":
                at, fmt, v = i + 4 + 8 * n_dims, "<I", v & 0xFFFFFFFF
            else:
                at, fmt = i + 4 + 8 * n_dims + 4, "<Q"
            b[at:at + struct.calcsize(fmt)] = struct.pack(fmt, v)
        out.write_bytes(bytes(b))
        _read_or_refused(out)
        assert rss_guard(), "peak RSS grew by more than RSS_LIMIT"

    prop()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # dequantizing garbage
def test_every_ggml_type_code(valid, tmp_path_factory):
    """Each tensor's ggml type set to every code 0..40 and a few past: read or a one-line
    CheckpointError. Found: Q8_1 (9) and other types the gguf package cannot dequantize raised
    AttributeError/NotImplementedError from gguf.quants."""
    path, data, _ = valid
    out = tmp_path_factory.mktemp("types") / "t.gguf"
    for _, i, n_dims in _tensor_fields(data):
        at = i + 4 + 8 * n_dims
        for code in [*range(41), 255, 1 << 31]:
            b = bytearray(data)
            b[at:at + 4] = struct.pack("<I", code)
            out.write_bytes(bytes(b))
            _read_or_refused(out)


# --- property B: typed values ------------------------------------------------------------------

CONFIG_KEYS = sorted(BASE_KEYS) + ["tokenizer.ggml.tokens", "general.alignment"]
# the words a refusal may use for a GGUF key: the key itself, or the HF field it becomes
HF_NAMES = {
    "gemma3.context_length": "max_position_embeddings", "gemma3.embedding_length": "hidden_size",
    "gemma3.block_count": "num_hidden_layers", "gemma3.feed_forward_length": "intermediate_size",
    "gemma3.attention.head_count": "num_attention_heads",
    "gemma3.attention.head_count_kv": "num_key_value_heads", "gemma3.attention.key_length":
    "head_dim", "gemma3.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "gemma3.rope.freq_base": "rope_theta", "gemma3.rope.scaling.type": "rope",
    "gemma3.rope.scaling.factor": "rope", "gemma3.attention.sliding_window": "sliding_window",
    "tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id", "tokenizer.ggml.tokens": "vocab",
}
SCALAR_TYPES = [VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64,
                VT.FLOAT32, VT.FLOAT64, VT.BOOL]
_RANGES = {VT.UINT8: (0, 255), VT.INT8: (-128, 127), VT.UINT16: (0, 65535),
           VT.INT16: (-32768, 32767), VT.UINT32: (0, 2**32 - 1), VT.INT32: (-2**31, 2**31 - 1),
           VT.UINT64: (0, 2**64 - 1), VT.INT64: (-2**63, 2**63 - 1)}
INTS = st.sampled_from([0, 1, 2, 3, 4, 5, 15, 16, 63, 64, 128, 255, 1 << 20, 2**31 - 1,
                        2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1, -1, -64, -2**31, -2**63]) \
    | st.integers(-300, 300)
FLOATS = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-6, 8.0, 1e6, 1e38, 1e300, float("inf"),
                          float("-inf"), float("nan"), 0.5]) | st.floats(width=32)


@st.composite
def typed_values(draw):
    """(value, GGUFValueType, sub_type) of any metadata type the format has."""
    kind = draw(st.sampled_from(["int", "float", "bool", "str", "array"]))
    if kind == "int":
        vt = draw(st.sampled_from([t for t in _RANGES]))
        lo, hi = _RANGES[vt]
        v = draw(INTS.filter(lambda v: lo <= v <= hi) | st.integers(lo, hi))
        return v, vt, None
    if kind == "float":
        v, vt = draw(FLOATS), draw(st.sampled_from([VT.FLOAT32, VT.FLOAT64]))
        if abs(v) > 3e38 and np.isfinite(v):  # past float32: the writer cannot pack it
            vt = VT.FLOAT64
        return v, vt, None
    if kind == "bool":
        return draw(st.booleans()), VT.BOOL, None
    if kind == "str":
        return draw(st.sampled_from(["", "64", "linear", "none", "yarn", "big", "\x00", "é" * 3])
                    | st.text(max_size=8)), VT.STRING, None
    sub = draw(st.sampled_from([VT.UINT32, VT.INT32, VT.FLOAT32, VT.STRING, VT.UINT8, VT.INT64]))
    if sub == VT.STRING:
        items = draw(st.lists(st.text(max_size=4), min_size=1, max_size=VOCAB + 2))
    elif sub == VT.FLOAT32:
        items = draw(st.lists(FLOATS.filter(lambda v: not abs(v) > 3e38 or not np.isfinite(v)),
                              min_size=1, max_size=8))
    else:
        lo, hi = _RANGES[sub]
        items = draw(st.lists(st.integers(lo, hi) | INTS.filter(lambda v: lo <= v <= hi),
                              min_size=1, max_size=8))
    return items, VT.ARRAY, sub


def _named(msg: str, key: str) -> bool:
    return key in msg or HF_NAMES.get(key, key) in msg


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # an alignment change reads garbage data
def test_typed_metadata_is_read_or_refused_naming_the_key(valid, rss_guard, tmp_path_factory):
    """One config key rewritten (by GGUFWriter) to a value of any type, or dropped: the file reads
    to a valid config, or the refusal is a CheckpointError naming that key (or the HF field it
    maps to; an alignment that is not a power of two names general.alignment), within
    TIME_LIMIT. An accepted value must give sane sizes (positive integers, finite floats)."""
    out = tmp_path_factory.mktemp("typed") / "t.gguf"

    @settings(max_examples=120 * SCALE, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.sampled_from(CONFIG_KEYS), st.none() | typed_values())
    def prop(key, value):
        if key == "tokenizer.ggml.tokens" and value is None:
            overrides = {key: None}
        else:
            overrides = {key: value}
        write_gguf(out, overrides)
        t0 = time.monotonic()
        try:
            cfg = read_all(out)
        except CheckpointError as e:
            msg = str(e)
            assert "\n" not in msg, msg
            if key == "general.alignment":  # moves the data: tensors past the end, or garbage
                assert any(w in msg for w in ("alignment", "ends at byte", "NaN or infinite")), msg
            else:
                assert _named(msg, key), (key, value, msg)
            return
        finally:
            assert time.monotonic() - t0 < TIME_LIMIT
        assert rss_guard(), "peak RSS grew by more than RSS_LIMIT"
        t = cfg.text
        for f in ("hidden_size", "num_hidden_layers", "vocab_size", "head_dim",
                  "num_attention_heads", "num_key_value_heads"):
            v = getattr(t, f)
            assert isinstance(v, int) and not isinstance(v, bool) and v > 0, (f, v)
        assert np.isfinite(t.rms_norm_eps) and t.rms_norm_eps > 0

    prop()


@st.composite
def huge_counts(draw):
    """A metadata array or string whose count/length prefix is patched to a huge value."""
    return (draw(st.sampled_from(["tokenizer.ggml.tokens", "tokenizer.ggml.model",
                                  "gemma3.rope.scaling.type"])),
            draw(st.sampled_from([1 << 32, 1 << 40, 1 << 62, (1 << 64) - 1, 1 << 20])))


def _value_offset(data: bytes, key: str) -> int:
    """The offset of `key`'s value (after its key string and u32 type) in a GGUF's bytes."""
    kb = key.encode()
    i = data.index(struct.pack("<Q", len(kb)) + kb)
    return i + 8 + len(kb) + 4


def test_huge_claimed_counts_are_refused_fast(valid, rss_guard, tmp_path_factory):
    """A string length or array count in the metadata patched to 2^20..2^64-1: refused with a
    CheckpointError naming the key, before anything that size is allocated (time and RSS)."""
    path, data, _ = valid
    out = tmp_path_factory.mktemp("counts") / "c.gguf"

    @settings(max_examples=20 * SCALE, deadline=None, database=None)
    @given(huge_counts())
    def prop(case):
        key, n = case
        b = bytearray(data)
        off = _value_offset(data, key)
        if key == "tokenizer.ggml.tokens":  # array: u32 element type, then u64 count
            off += 4
        b[off:off + 8] = struct.pack("<Q", n)
        out.write_bytes(bytes(b))
        t0 = time.monotonic()
        with pytest.raises(CheckpointError) as e:
            read_all(out)
        assert time.monotonic() - t0 < TIME_LIMIT
        assert key in str(e.value), str(e.value)
        assert rss_guard()

    prop()


def test_wrong_array_element_type_is_refused(valid, tmp_path_factory):
    """The token list's element type patched to each other type (numbers, nested arrays, unknown
    codes): a one-line CheckpointError, quickly. (It need not name tokenizer.ggml.tokens: read
    as bytes, the strings misalign the next key, and the refusal names where parsing broke.)"""
    path, data, _ = valid
    out = tmp_path_factory.mktemp("etype") / "e.gguf"
    off = _value_offset(data, "tokenizer.ggml.tokens")
    for etype in [*range(0, 14), 255, 1 << 31]:
        b = bytearray(data)
        b[off:off + 4] = struct.pack("<I", etype)
        out.write_bytes(bytes(b))
        t0 = time.monotonic()
        if etype == 8:  # unchanged: strings
            read_all(out)
            continue
        with pytest.raises(CheckpointError) as e:
            read_all(out)
        assert time.monotonic() - t0 < TIME_LIMIT
        assert "\n" not in str(e.value), (etype, str(e.value))


def test_deeply_nested_arrays_are_refused(tmp_path):
    """An array of arrays of arrays ... 100k deep (12 bytes a level, 1.2 MB): a CheckpointError,
    not a RecursionError."""
    depth = 100_000
    body = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a"
            + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0))
    p = tmp_path / "deep.gguf"
    p.write_bytes(body)
    g3gguf._cached.cache_clear()
    t0 = time.monotonic()
    with pytest.raises(CheckpointError):
        open_gguf(p)
    assert time.monotonic() - t0 < TIME_LIMIT


# --- through the CLI ---------------------------------------------------------------------------


def test_cli_build_refuses_mutated_ggufs(valid, tmp_path):
    """`g3export build --checkpoint bad.gguf` in a fresh process: a truncated header, a wrong-typed
    embedding length and a huge token count each exit non-zero with one `Error:` line naming the
    problem, and no traceback."""
    path, data, _ = valid
    cases = {}
    cases["truncated"] = (data[:40], "GGUF")
    write_gguf(tmp_path / "typed.gguf", {"gemma3.embedding_length": ("64", VT.STRING)})
    cases["typed"] = ((tmp_path / "typed.gguf").read_bytes(), "gemma3.embedding_length")
    b = bytearray(data)
    off = _value_offset(data, "tokenizer.ggml.tokens") + 4
    b[off:off + 8] = struct.pack("<Q", 1 << 40)
    cases["count"] = (bytes(b), "tokenizer.ggml.tokens")
    for name, (blob, word) in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(blob)
        r = cli("build", "--checkpoint", p, "--out", tmp_path / f"out_{name}", timeout=120)
        assert_refused(r, word)
        assert not (tmp_path / f"out_{name}").exists()


def test_non_ascii_digit_block_index_is_not_a_gemma_name():
    """`blk.².attn_q.weight`: str.isdigit() accepts '²' but int() refuses it (a ValueError, not a
    CheckpointError); such a name is now simply not a Gemma 3 tensor."""
    from g3export.modeling.gguf import gguf_name

    assert gguf_name("blk.\u00b2.attn_q.weight") is None
    assert gguf_name("blk.\u0663.attn_q.weight") is None  # Arabic-Indic 3
    assert gguf_name("blk.3.attn_q.weight") == "language_model.layers.3.self_attn.q_proj.weight"


def test_zero_d_tensors(valid):
    """A 0-D tensor is one element: with a block type (Q4_0) it is refused as not whole blocks
    (it was 1 // 32 = 0 bytes, then an IndexError in GGUFTensor.raw); with a plain type (F32,
    BF16) `raw` gives its one element."""
    from g3export.modeling.gguf import GGUFTensor

    path, data, data_start = valid
    f32 = GGUFTensor("x", (), 0, data_start, 4, path)
    assert f32.raw().shape == ()
    bf16 = GGUFTensor("x", (), 30, data_start, 2, path)
    assert bf16.raw().size == 2  # its two bytes, for gguf.quants.dequantize
    fields = _tensor_fields(data)
    _, i, _ = fields[3]  # output_norm.weight: n_dims 0, and the type read from its first dim
    b = bytearray(data)
    b[i:i + 12] = struct.pack("<IQ", 0, 2)
    out = path.parent / "zero_d.gguf"
    out.write_bytes(bytes(b))
    g3gguf._cached.cache_clear()
    with pytest.raises(CheckpointError, match="not whole Q4_0 blocks"):
        open_gguf(out)
