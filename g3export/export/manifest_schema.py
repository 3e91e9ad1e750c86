"""The schema of manifest.json and the checks of a build directory's files
(g3export.export.manifest's docstring says what is checked and why).

Hand-written rather than a schema library (jsonschema, pydantic): the checks that matter most are
not types but agreements (the KV layout and graph I/O against the model config, every named file
listed and hashed, paths confined to the directory), which a schema language does not express;
the type checks are a few small readers, and each refusal names the manifest entry in words a
user can act on. `bool` is never accepted where a number belongs (`format_version: true` is not
1), nor a float where an int belongs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Mapping

from ..dtypes import DTYPES, ONNX_NUMPY
from ..errors import BuildError
from ..modeling.config import ConfigError, ModelConfig, RopeConfig, TextConfig, VisionConfig
from .build_files import short

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def fail(where: str, what: str) -> None:
    raise BuildError(f"manifest entry `{where}` {what}")


def _is(v: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "number":
        return (isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(float(v)))
    return isinstance(v, {"str": str, "bool": bool, "list": list, "object": dict,
                          "null": type(None)}[kind])


def get(d: Mapping[str, Any], key: str, kinds: str, where: str = "", default: Any = ...) -> Any:
    """d[key], which must be one of `kinds` ("int|null"); `default` when absent (else refused)."""
    path = f"{where}.{key}" if where else key
    if key not in d:
        if default is ...:
            fail(path, "is missing")
        return default
    v = d[key]
    if not any(_is(v, k) for k in kinds.split("|")):
        fail(path, f"must be {kinds.replace('|', ' or ')}, got {short(v)}")
    return v


def obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        fail(where, f"must be an object, got {short(v)}")
    return v


def choice(d: Mapping[str, Any], key: str, choices, where: str = "") -> str:
    v = get(d, key, "str", where)
    if v not in choices:
        fail(f"{where}.{key}" if where else key, f"is {short(v)}; known: {', '.join(choices)}")
    return v


# ---------------------------------------------------------------------------------------------
# readers for the types in g3export.export.manifest


def tensor_spec(d: Any, where: str) -> dict[str, Any]:
    d = obj(d, where)
    shape = get(d, "shape", "list", where)
    for i, s in enumerate(shape):
        if not (_is(s, "str") or (_is(s, "int") and s >= 0)):
            fail(f"{where}.shape[{i}]", f"must be a size or a symbolic name, got {short(s)}")
    return {"name": get(d, "name", "str", where),
            "dtype": choice(d, "dtype", tuple(ONNX_NUMPY), where),
            "shape": tuple(shape), "aliases": get(d, "aliases", "str|null", where, None)}


def component(d: Any, where: str) -> dict[str, Any]:
    d = obj(d, where)
    if not get(d, "file", "str", where).endswith(".onnx"):
        fail(f"{where}.file", f"is {short(d['file'])}, not an .onnx graph")
    return {"name": get(d, "name", "str", where), "file": get(d, "file", "str", where),
            "options": dict(get(d, "options", "object", where, {})),
            "inputs": [tensor_spec(t, f"{where}.inputs[{i}]")
                       for i, t in enumerate(get(d, "inputs", "list", where))],
            "outputs": [tensor_spec(t, f"{where}.outputs[{i}]")
                        for i, t in enumerate(get(d, "outputs", "list", where))]}


_TRT_FIELDS = {  # name: (kinds, default; ... = required)
    "flavour": ("str", ...), "library": ("str", ...), "version": ("str|null", None),
    "compute_capabilities": ("list|null", None), "dtype": ("str", ...),
    "attention": ("str", ...), "prefill_chunk": ("int", ...), "max_batch": ("int", 1),
    "chunk_align": ("int|null", None), "opset": ("int|null", None),
    "plugin": ("object|null", None), "strongly_typed": ("bool", True),
    "fp16_note": ("str|null", None), "timing_cache": ("str|null", None),
    "onnx_only": ("list", []),
}


def _profile(p: dict[str, Any], where: str) -> None:
    """{"name": str, "shapes": {input: [min, opt, max]}}: three int lists of one rank each,
    0 <= min <= opt <= max."""
    get(p, "name", "str", where)
    for name, v in get(p, "shapes", "object", where, {}).items():
        w = f"{where}.shapes.{name}"
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(s, list) for s in v)
                and len({len(s) for s in v}) == 1 and all(_is(x, "int") for s in v for x in s)):
            fail(w, f"must be [min, opt, max], three int lists of one rank, got {short(v)}")
        if not all(0 <= a <= b <= c for a, b, c in zip(*v)):
            fail(w, f"must have 0 <= min <= opt <= max in every dimension, got {short(v)}")


def tensorrt(d: Any, where: str, fields: list[str]) -> dict[str, Any]:
    d = obj(d, where)
    out = {k: get(d, k, kinds, where, default) for k, (kinds, default) in _TRT_FIELDS.items()}
    for k in ("prefill_chunk", "max_batch"):
        if out[k] < 1:
            fail(f"{where}.{k}", f"must be >= 1, got {out[k]}")
    for k in ("compute_capabilities", "onnx_only"):
        if out[k] is not None and not all(isinstance(x, str) for x in out[k]):
            fail(f"{where}.{k}", "must be a list of strings")
    engines = {}
    for name, e in get(d, "engines", "object", where).items():
        w = f"{where}.engines.{name}"
        e = obj(e, w)
        profiles = get(e, "profiles", "list", w)
        for i, p in enumerate(profiles):
            _profile(obj(p, f"{w}.profiles[{i}]"), f"{w}.profiles[{i}]")
        engines[name] = {"file": get(e, "file", "str", w), "onnx": get(e, "onnx", "str", w),
                         "profiles": tuple(profiles),
                         "extra": {k: v for k, v in e.items()
                                   if k not in ("file", "onnx", "profiles")}}
    out["engines"] = engines
    out["extra"] = {k: v for k, v in d.items() if k not in fields}
    return out


# what a field's annotation (a string: `from __future__ import annotations`) lets it hold
_ANNOTATION_KINDS = {"int": "int", "float": "number", "str": "str", "bool": "bool",
                     "float | None": "number|null", "int | None": "int|null"}


def _typed_fields(d: Any, cls: type, where: str) -> dict[str, Any]:
    """d, checked against the simple-typed fields of the config dataclass `cls`."""
    d = obj(d, where)
    for f in dataclasses.fields(cls):
        kinds = _ANNOTATION_KINDS.get(str(f.type))
        if kinds is not None:
            missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            get(d, f.name, kinds, where, ... if missing else None)
    return d


def model_config(d: Any) -> ModelConfig:
    d = _typed_fields(d, ModelConfig, "model")
    t = _typed_fields(get(d, "text", "object", "model"), TextConfig, "model.text")
    for k in ("layer_types", "eos_token_ids"):
        get(t, k, "list", "model.text", [])
    for k, r in get(t, "rope", "object", "model.text").items():
        _typed_fields(r, RopeConfig, f"model.text.rope.{k}")
    if get(d, "vision", "object|null", "model", None) is not None:
        _typed_fields(d["vision"], VisionConfig, "model.vision")
    try:
        return ModelConfig.from_dict(d)
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:
        fail("model", f"is not a valid model config ({e})")


# ---------------------------------------------------------------------------------------------
# the parts must agree with each other


def check_agreement(man: Any, recorded_kv: dict, contracts: Any) -> None:
    """contracts(): {component: the ComponentIO this model's graph has (export/graph_io)},
    called once the KV layout is known to fit."""
    cfg, t = man.model, man.model.text
    try:
        layout = man.kv_layout
    except ConfigError as e:
        fail("max_context", f"does not fit the model ({e})")
    if recorded_kv != json.loads(json.dumps(layout.to_dict())):
        fail("kv_layout", f"is not the layout of this model at max_context {man.max_context} "
                           f"and dtype {man.dtype}")
    mdt = DTYPES[man.dtype].onnx_name
    want = contracts()
    text = man.components.get("text")
    if text is not None:
        ins, outs = {s.name: s for s in text.inputs}, {s.name: s for s in text.outputs}
        _need(ins, "input_ids", "components.text.inputs")
        _need(ins, "start_pos", "components.text.inputs")
        logits = _need(outs, "logits", "components.text.outputs")
        if logits.shape[-1:] != (t.vocab_size,):
            fail("components.text.outputs.logits", f"has shape {list(logits.shape)}; the "
                  f"model's vocabulary has {t.vocab_size} rows")
        pasts = [n for n in ins if n.startswith("past_")]
        if len(pasts) != 2 * len(layout.layers):
            fail("components.text.inputs", f"has {len(pasts)} past_* caches; the KV layout "
                  f"has {2 * len(layout.layers)}")
        for lc in layout.layers:
            for past in (lc.k_name, lc.v_name):
                s = _need(ins, past, "components.text.inputs")
                present = [o for o in text.outputs if o.aliases == past]
                if (s.dtype != mdt or s.shape[1:] != lc.shape[1:] or len(present) != 1
                        or present[0].shape != s.shape or present[0].dtype != s.dtype):
                    fail(f"components.text.inputs.{past}",
                          f"is {s.dtype} {list(s.shape)}; the KV layout says {mdt} "
                          f"[batch, {', '.join(map(str, lc.shape[1:]))}] with one output "
                          f"aliasing it")
        if "image_features" in ins and ins["image_features"].shape[-1:] != (t.hidden_size,):
            fail("components.text.inputs.image_features", f"is not [*, {t.hidden_size}]")
        if bool(text.options.get("images")) != ("image_features" in ins):
            fail("components.text.options.images", "disagrees with the graph's inputs")
        if bool(text.options.get("all_logits")) != (logits.shape[1:2] == ("seq",)):
            fail("components.text.options.all_logits", "disagrees with the logits' shape")
        _same_io("components.text", text, want["text"])
    vision = man.components.get("vision")
    if vision is not None:
        if not cfg.has_vision:
            fail("components.vision", "is present but the model has no vision encoder")
        feats = _need({s.name: s for s in vision.outputs}, "image_features",
                      "components.vision.outputs")
        if feats.shape[-2:] != (cfg.mm_tokens_per_image, t.hidden_size):
            fail("components.vision.outputs.image_features", f"is {list(feats.shape)}, not "
                  f"[images, {cfg.mm_tokens_per_image}, {t.hidden_size}]")
        _same_io("components.vision", vision, want["vision"])
    trt = man.tensorrt
    if (trt is None) != (man.target == "onnx"):
        fail("tensorrt", "is missing (a TensorRT build)" if trt is None else
              "is present in an onnx build")
    if trt is not None:
        if trt.flavour != man.target or trt.dtype != man.dtype:
            fail("tensorrt", f"is a {trt.flavour} {trt.dtype} section in a {man.target} "
                  f"{man.dtype} build")
        for k in list(trt.engines) + list(trt.onnx_only):
            if k not in man.components:
                fail(f"tensorrt.engines.{k}", "names a component the build does not have")


def _same_io(where: str, io: Any, contract: Any) -> None:
    """io's inputs and outputs are exactly `contract`'s (a ComponentIO: no more, no fewer, same
    dtypes/shapes/aliases); an aliasing output is keyed by the input it aliases (its name is
    free)."""
    ins = {s.name: (s.dtype, s.shape, s.aliases) for s in contract.inputs}
    outs = {(s.aliases or s.name): (s.dtype, s.shape, s.aliases) for s in contract.outputs}
    got_in = {s.name: (s.dtype, s.shape, s.aliases) for s in io.inputs}
    got_out = {(s.aliases or s.name): (s.dtype, s.shape, s.aliases) for s in io.outputs}
    if len(got_in) != len(io.inputs) or len(got_out) != len(io.outputs) or len(
            {s.name for s in io.outputs}) != len(io.outputs):
        fail(where, "names a tensor twice")
    for kind, got, want in (("inputs", got_in, ins), ("outputs", got_out, outs)):
        for name in sorted(set(got) | set(want), key=str):
            if got.get(name) != want.get(name):
                fail(f"{where}.{kind}.{name}", f"is {short(got.get(name))}; this model's graph "
                     f"has {short(want.get(name))} (dtype, shape, aliases)")


def _need(specs: dict[str, Any], name: str, where: str) -> Any:
    if name not in specs:
        fail(where, f"has no {name!r}")
    return specs[name]
