"""The build format (g3export.export.manifest) on untrusted build directories: each hostile
manifest or file is refused with one `BuildError` line that names the entry and says to rebuild;
the fixed cases load; a property test mutates manifest.json at random and asserts that
`load_build` either refuses it with a BuildError or opens a build with the same graph contract,
never anything else. Also: opening a build imports neither torch nor the exporter's libraries,
and `verify` fails a build whose logits are NaN.

Every refusal below was a traceback, a silent acceptance or a read outside the directory on main
before this module existed (issue 15): a manifest that is a list, lacks `dtype`/`components`/
file sizes, has a string `max_context`, `format_version: true` (read as 1), an unknown dtype, a
`max_context` or vocabulary that disagrees with the graph, `../` and absolute paths, an empty
`files` table (which switched hashing off), an unlisted tokenizer (loaded without a hash check).
One tiny build is exported per module; each test edits a copy.
"""

from __future__ import annotations

import copy as copylib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from g3export.export.build import build
from g3export.export.build_files import sha256_file
from g3export.export.manifest import BuildError, Manifest, load_build
from g3export.modeling.config import preset
from g3export.modeling.text import Gemma3Model

MAX_CONTEXT = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manifest")
    tok = root / "tok.json"
    tok.write_text('{"model": "dummy"}')
    torch.manual_seed(0)
    return build(Gemma3Model(preset("tiny")).eval(), tok, root / "tiny", max_context=MAX_CONTEXT,
                 progress=False)


@pytest.fixture
def copy(tiny, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(tiny, dst)
    return dst


def _edit(path: Path, fn) -> None:
    p = path / "manifest.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def _rehash(path: Path, name: str) -> None:
    def fix(d):
        d["files"][name] = {"size": (path / name).stat().st_size,
                            "sha256": sha256_file(path / name)}
    _edit(path, fix)


def _set(keys: str, value):
    """A manifest edit: d[k1][k2]... = value (value ... deletes)."""
    def fn(d):
        *head, last = keys.split("/")
        for k in head:
            d = d[int(k)] if isinstance(d, list) else d[k]
        if value is ...:
            del d[last]
        else:
            d[int(last) if isinstance(d, list) else last] = value
    return fn


def _write(raw: bytes):
    return lambda path: (path / "manifest.json").write_bytes(raw)


def _manifest(fn):
    return lambda path: _edit(path, fn)


def _max_context_and_layout(path: Path) -> None:
    """max_context 24 with a KV layout that matches it: the graph's I/O (32) still disagrees."""
    from g3export.modeling.cache import kv_layout

    def fn(d):
        d["max_context"] = 24
        d["kv_layout"] = json.loads(json.dumps(kv_layout(preset("tiny").text, 24).to_dict()))
    _edit(path, fn)


def _symlink_tokenizer(path: Path) -> None:
    outside = path.parent / "outside.json"
    outside.write_text('{"model": "dummy"}')
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.json").symlink_to(outside)
    _rehash(path, "tokenizer.json")


def _fifo_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").unlink()
    os.mkfifo(path / "tokenizer.json")


def _fifo_manifest(path: Path) -> None:
    (path / "manifest.json").unlink()
    os.mkfifo(path / "manifest.json")


def _external_data_outside(path: Path) -> None:
    import onnx

    m = onnx.load(str(path / "text.onnx"), load_external_data=False)
    for e in _largest_external(m).external_data:
        if e.key == "location":
            e.value = "../../secret.data"
    onnx.save(m, str(path / "text.onnx"))
    _rehash(path, "text.onnx")


def _external_data_outside_in_a_branch(path: Path) -> None:
    """A Constant inside an If branch (each layer's attention is one) whose tensor names
    external data outside the build: refused like an initializer's. The check used to read
    only the main graph's nodes."""
    import onnx

    m = onnx.load(str(path / "text.onnx"), load_external_data=False)
    step = [n for n in m.graph.node if n.op_type == "If"][-1]
    branch = next(a.g for a in step.attribute if a.name == "else_branch")
    branch.node.append(onnx.helper.make_node("Constant", [], ["secret"],
                                             value=_outside_tensor("secret")))
    onnx.save(m, str(path / "text.onnx"))
    _rehash(path, "text.onnx")


def _outside_tensor(name: str):
    import onnx

    t = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [2], [0.0, 0.0])
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../../secret.data"), ("offset", "0"), ("length", "8")):
        t.external_data.add(key=k, value=v)
    return t


def _external_data_outside_in_a_function(path: Path) -> None:
    """The same Constant inside a local function of the model."""
    import onnx

    m = onnx.load(str(path / "text.onnx"), load_external_data=False)
    m.functions.append(onnx.helper.make_function(
        "g3.test", "Secret", [], ["y"],
        [onnx.helper.make_node("Constant", [], ["y"], value=_outside_tensor("secret"))],
        [onnx.helper.make_opsetid("", 18)]))
    onnx.save(m, str(path / "text.onnx"))
    _rehash(path, "text.onnx")


def _external_data_outside_sparse(path: Path) -> None:
    """A sparse initializer whose values name external data outside the build."""
    import onnx

    m = onnx.load(str(path / "text.onnx"), load_external_data=False)
    indices = onnx.helper.make_tensor("secret_idx", onnx.TensorProto.INT64, [2], [0, 1])
    m.graph.sparse_initializer.append(
        onnx.helper.make_sparse_tensor(_outside_tensor("secret"), indices, [4]))
    onnx.save(m, str(path / "text.onnx"))
    _rehash(path, "text.onnx")


def _largest_external(m):
    """The largest initializer stored in the .data file (small ones are inline)."""
    ext = [i for i in m.graph.initializer if i.external_data]
    return max(ext, key=lambda i: int({e.key: e.value for e in i.external_data}["length"]))


def _altered_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").write_text('{"model": "other"}')  # same size? no matter: hashed


CASES = [  # (id, mutation of the build copy, words the one-line BuildError must contain)
    ("list", _write(b"[1, 2]"), "must be a JSON object"),
    ("not-json", _write(b"{nope"), "not valid JSON"),
    ("not-utf8", _write(b'{"a": "\xff\xfe"}'), "not UTF-8"),
    ("fifo-manifest", _fifo_manifest, "not a regular file"),
    ("no-dtype", _manifest(_set("dtype", ...)), "`dtype` is missing"),
    ("no-components", _manifest(_set("components", ...)), "`components` is missing"),
    ("no-size", _manifest(_set("files/text.onnx/size", ...)), "`files.text.onnx.size` is missing"),
    ("string-max-context", _manifest(_set("max_context", "32")), "`max_context` must be int"),
    ("bool-format", _manifest(_set("format_version", True)), "`format_version` must be int"),
    ("zero-format", _manifest(_set("format_version", 0)), "`format_version` is 0"),
    ("unknown-dtype", _manifest(_set("dtype", "fp8")), '`dtype` is "fp8"'),
    ("unknown-target", _manifest(_set("target", "cuda")), '`target` is "cuda"'),
    ("string-hidden", _manifest(_set("model/text/hidden_size", "64")),
     "`model.text.hidden_size` must be int"),
    ("string-eps", _manifest(_set("model/text/rms_norm_eps", "x")),
     "`model.text.rms_norm_eps` must be number"),
    ("max-context", _manifest(_set("max_context", 24)), "`kv_layout` is not the layout"),
    ("max-context+layout", _max_context_and_layout, "`components.text.inputs.past_key_"),
    ("vocabulary", _manifest(_set("model/text/vocab_size", 1024)), "vocabulary has 1024 rows"),
    ("no-kv-layout", _manifest(_set("kv_layout", ...)), "`kv_layout` is missing"),
    ("shape-string", _manifest(_set("components/text/inputs/0/shape", "x")),
     "`components.text.inputs[0].shape` must be list"),
    ("no-alias", _manifest(_set("components/text/outputs/1/aliases", None)), "aliasing it"),
    ("negative-size", _manifest(_set("files/text.onnx/size", -1)), "size >= 0"),
    ("trt-in-onnx", _manifest(_set("tensorrt", {"flavour": "trt"})), "tensorrt"),
    ("files-dotdot", _manifest(lambda d: d["files"].__setitem__(
        "../../etc/passwd", {"size": 1, "sha256": "0" * 64})), "not a plain file name"),
    ("tokenizer-absolute", _manifest(_set("tokenizer", "/etc/passwd")),
     "`tokenizer` names \"/etc/passwd\""),
    ("component-dotdot", _manifest(_set("components/text/file", "../../x.onnx")),
     "`components.text.file` names"),
    ("component-not-onnx", _manifest(_set("components/text/file", "text.onnx.data")),
     "not an .onnx graph"),
    ("tokenizer-symlink-out", _symlink_tokenizer, "resolves outside"),
    ("tokenizer-fifo", _fifo_tokenizer, "not a regular file"),
    ("files-empty", _manifest(_set("files", {})), "`files` is empty"),
    ("files-missing", _manifest(_set("files", ...)), "`files` is missing"),
    ("tokenizer-unlisted", _manifest(_set("files/tokenizer.json", ...)),
     "tokenizer.json (manifest entry `tokenizer`) is not listed"),
    ("data-unlisted", _manifest(_set("files/text.onnx.data", ...)),
     "text.onnx.data (the external data of text.onnx) is not listed"),
    ("external-data-outside", _external_data_outside,
     "`the external data of text.onnx` names \"../../secret.data\""),
    ("external-data-outside-in-a-branch", _external_data_outside_in_a_branch,
     "`the external data of text.onnx` names \"../../secret.data\""),
    ("external-data-outside-in-a-function", _external_data_outside_in_a_function,
     "`the external data of text.onnx` names \"../../secret.data\""),
    ("external-data-outside-sparse", _external_data_outside_sparse,
     "`the external data of text.onnx` names \"../../secret.data\""),
    ("tokenizer-altered", _altered_tokenizer, "tokenizer.json"),
]


@pytest.mark.parametrize("mutate,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused(copy, mutate, words):
    mutate(copy)
    with pytest.raises(BuildError) as e:
        load_build(copy)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg
    assert "rebuild" in msg or "build again" in msg, msg


def test_inspect_refuses_the_same(copy):
    from click.testing import CliRunner

    from g3export.cli import main

    _edit(copy, _set("files", {}))
    r = CliRunner().invoke(main, ["inspect", str(copy)])
    assert r.exit_code == 1 and "`files` is empty" in r.output and "Traceback" not in r.output


FIXED = [  # (id, edit): builds that must still load
    ("unchanged", lambda d: None),
    ("unknown-extra-key", _set("note", "hello")),       # ignored, as a newer writer might add
    ("no-optional-metadata", lambda d: [d.pop(k) for k in ("created", "versions", "extra",
                                                            "export_seconds", "g3export_version")]),
    ("null-tokenizer", lambda d: (d.__setitem__("tokenizer", None),
                                  d["files"].pop("tokenizer.json"))),
]


@pytest.mark.parametrize("edit", [f[1] for f in FIXED], ids=[f[0] for f in FIXED])
def test_fixed_cases_load(copy, edit):
    _edit(copy, edit)
    b = load_build(copy)
    assert b.max_context == MAX_CONTEXT and b.kv_layout().bytes > 0


def test_round_trip(tiny):
    b = load_build(tiny)
    m = b.manifest
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert m.kv_layout == b.kv_layout() and b.kv_layout(3).layers[0].shape[0] == 3
    io = b.component("text")
    assert io.present("past_key_0") == "present_key_0"


def test_open_without_torch(tiny):
    """Opening a build, and an ONNX Runtime session on it, imports neither torch nor onnx_ir nor
    onnxscript (a fresh interpreter)."""
    code = ("import sys\n"
            "from g3export.export.manifest import load_build\n"
            "from g3export.runtimes.ort_session import OrtSession\n"
            f"b = load_build({str(tiny)!r})\n"
            "s = OrtSession.from_build(b)\n"
            "heavy = {'torch', 'onnx_ir', 'onnxscript'} & set(sys.modules)\n"
            "assert not heavy, heavy\n"
            "import g3export\n"
            "assert 'g3export.api' not in sys.modules and callable(g3export.build)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_verify_fails_on_nan_logits(copy):
    """The tied embedding overwritten with NaN (hash fixed up, so the build loads): the
    reference, read from the same weights, is NaN too, so every difference is NaN; main reported
    OK (max(0, nan) is 0). verify must fail and say where."""
    import onnx

    from g3export.runtimes.verify import verify

    m = onnx.load(str(copy / "text.onnx"), load_external_data=False)
    init = _largest_external(m)  # the tied embedding: lookup and lm_head
    ext = {e.key: e.value for e in init.external_data}
    with open(copy / ext["location"], "r+b") as f:
        f.seek(int(ext.get("offset", 0)))
        f.write(np.full(int(ext["length"]) // 4, np.nan, np.float32).tobytes())
    _rehash(copy, ext["location"])
    rep = verify(copy, decode_steps=2)
    assert not rep.ok and any(w.startswith("logits") for w in rep.nonfinite), rep.to_dict()
    assert "FAILED" in rep.format() and "NaN" in rep.format()


# ---- property: random mutations of manifest.json -------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                         max_size=3),
                    max_leaves=6)


def _paths(d, prefix=()):
    """Every (path to a value) in a JSON tree."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _swap(v):
    """The same content with another JSON type."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return {str(i): x for i, x in enumerate(v)}
    if isinstance(v, dict):
        return list(v.values())
    return 0


def _contract(b):
    """What a runtime relies on: equal contracts = an equivalent manifest."""
    m = b.manifest
    return (m.target, m.dtype, m.max_context, m.tokenizer, m.files, m.kv_layout, m.tensorrt,
            {k: (c.file, c.inputs, c.outputs, bool(c.options.get("images")),
                 bool(c.options.get("all_logits"))) for k, c in m.components.items()})


@pytest.fixture(scope="module")
def fuzz_dir(tiny, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(tiny, dst)
    return dst


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=st.data())
def test_random_mutations_are_refused_or_equivalent(fuzz_dir, tiny, data):
    original = json.loads((tiny / "manifest.json").read_text())
    d = copylib.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(d))
        if not paths:
            break
        *head, last = data.draw(st.sampled_from(paths))
        parent = d
        for k in head:
            parent = parent[k]
        action = data.draw(st.sampled_from(["delete", "replace", "swap"]))
        if action == "delete":
            del parent[last]
        else:
            parent[last] = data.draw(JSON) if action == "replace" else _swap(parent[last])
    (fuzz_dir / "manifest.json").write_text(json.dumps(d))
    try:
        b = load_build(fuzz_dir)
    except BuildError as e:
        assert "\n" not in str(e)
        return
    assert _contract(b) == _contract(load_build(tiny))
