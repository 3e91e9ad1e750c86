"""The TensorRT text engine's ONE optimization profile and the runtime's two execution contexts on
it (issue 12), checked on CPU: no engine is built or run here (that needs TensorRT-RTX,
tests/export/test_trt_build.py, and a GPU).

* `text_profile` turns the text graph's contract (graph_io.text_io) into one profile: seq
  1..chunk, batch 1..max_batch, image rows 1..chunk, opt = the decode step's shape.
* `EngineEntry.profile_for` picks the profile every runtime step runs in: the one profile of a
  new build, the `prefill` profile of a build made with `prefill` + `decode` profiles (in either
  order), a refusal when none covers the session's batch or chunk.
* The manifest refuses malformed profile shapes in one BuildError line.
* `make_contexts` (trt_session) against a fake engine: both contexts are created on the chosen
  profile and switched on the session's stream; TensorRT-RTX's decode context compiles its
  specialised kernels eagerly (it is captured in a CUDA graph), the prefill context keeps the
  default; a context TensorRT cannot create or switch is a BuildError, not a None later.
"""

from __future__ import annotations

import pytest

from g3export.errors import BuildError
from g3export.export.graph_io import text_io
from g3export.export.manifest import EngineEntry, TensorRTSection
from g3export.export.trt.engine import TEXT_PROFILE, text_profile
from g3export.modeling.config import preset
from g3export.runtimes.trt_session import make_contexts

CHUNK, MAX_BATCH, MAX_CONTEXT = 16, 4, 64


def _entry(*profiles) -> EngineEntry:
    return EngineEntry("text.engine", "text.onnx", tuple(p.to_dict() for p in profiles))


def test_one_profile_covers_prefill_and_decode_opt_is_decode():
    cfg = preset("tiny-vision")
    io = text_io(cfg, MAX_CONTEXT, "bf16", images=True)
    p = text_profile(io, CHUNK, max_batch=MAX_BATCH)
    h = cfg.text.hidden_size
    assert p.name == TEXT_PROFILE
    assert p.shapes["input_ids"] == ((1, 1), (1, 1), (MAX_BATCH, CHUNK))
    assert p.shapes["start_pos"] == ((1,), (1,), (MAX_BATCH,))
    assert p.shapes["image_features"] == ((1, h), (1, h), (CHUNK, h))
    pasts = [t for t in io.inputs if t.name.startswith("past_")]
    assert len(pasts) == 2 * cfg.text.num_hidden_layers
    for t in pasts:  # batch dynamic, the rest of the cache static
        mn, opt, mx = p.shapes[t.name]
        assert mn == opt == (1, *t.shape[1:]) and mx == (MAX_BATCH, *t.shape[1:])
    assert set(p.shapes) == {t.name for t in io.inputs}  # every input has a symbolic dim


def test_profile_for_new_and_old_builds():
    io = text_io(preset("tiny"), MAX_CONTEXT, "bf16")
    new = _entry(text_profile(io, CHUNK, max_batch=MAX_BATCH))
    for batch in (1, MAX_BATCH):
        assert new.profile_for(batch, CHUNK) == 0
    # a build before issue 12: `prefill` (seq 1..chunk, opt chunk) and `decode` (seq 1)
    from g3export.export.trt.engine import Profile

    prefill = Profile("prefill", {"input_ids": ((1, 1), (1, CHUNK), (MAX_BATCH, CHUNK))})
    decode = Profile("decode", {"input_ids": ((1, 1), (1, 1), (MAX_BATCH, 1))})
    assert _entry(prefill, decode).profile_for(MAX_BATCH, CHUNK) == 0
    assert _entry(decode, prefill).profile_for(1, CHUNK) == 1
    with pytest.raises(BuildError, match=r"batch 1\.\.5 and 1\.\.16 tokens.*rebuild"):
        new.profile_for(MAX_BATCH + 1, CHUNK)
    with pytest.raises(BuildError, match=r"1\.\.17 tokens \(profiles: \['decode'\]\)"):
        _entry(decode).profile_for(1, CHUNK + 1)


def _section(shapes) -> dict:
    return {"flavour": "trt-rtx", "library": "tensorrt_rtx", "dtype": "bf16",
            "attention": "native", "prefill_chunk": CHUNK,
            "engines": {"text": {"file": "text.engine", "onnx": "text.onnx",
                                 "profiles": [{"name": TEXT_PROFILE, "shapes": shapes}]}}}


@pytest.mark.parametrize("shapes,words", [
    ({"input_ids": [[1, 1], [1, 1]]}, "must be [min, opt, max]"),
    ({"input_ids": [[1, 1], [1, 1], [4]]}, "must be [min, opt, max]"),
    ({"input_ids": [[1, 1], [1, 1], [4, "16"]]}, "must be [min, opt, max]"),
    ({"input_ids": [[1, 1], [1, 1], [4, True]]}, "must be [min, opt, max]"),
    ({"input_ids": [[1, 1], [1, 32], [4, 16]]}, "min <= opt <= max"),
    ({"input_ids": "1x1"}, "must be [min, opt, max]"),
    ([], "must be object"),
])
def test_malformed_profile_shapes_refused(shapes, words):
    with pytest.raises(BuildError) as e:
        TensorRTSection.from_dict(_section(shapes))
    msg = str(e.value)
    assert words in msg and "tensorrt.engines.text.profiles[0].shapes" in msg and "\n" not in msg


def test_wellformed_profile_loads():
    io = text_io(preset("tiny"), MAX_CONTEXT, "bf16")
    shapes = text_profile(io, CHUNK, max_batch=MAX_BATCH).to_dict()["shapes"]
    s = TensorRTSection.from_dict(_section(shapes))
    assert s.engines["text"].profile_for(MAX_BATCH, CHUNK) == 0


# ---------------------------------------------------------------------------------------------
# The execution contexts, against a fake engine


class _Config:
    dynamic_shapes_kernel_specialization_strategy = "LAZY"


class _Ctx:
    def __init__(self, engine, config, accept):
        self.engine, self.config, self.accept, self.profile = engine, config, accept, None

    def set_optimization_profile_async(self, index, stream):
        if not self.accept or not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = (index, stream)
        return True


class _Engine:
    num_optimization_profiles = 1

    def __init__(self, accept=True, create=True):
        self.accept, self.create = accept, create

    def create_runtime_config(self):
        return _Config()

    def create_execution_context(self, runtime_config=None):
        return _Ctx(self, runtime_config, self.accept) if self.create else None


class _Rtx:
    class DynamicShapesKernelSpecializationStrategy:
        EAGER = "EAGER"


class _ClassicTrt:  # TensorRT without run-time kernel specialisation
    pass


def test_contexts_share_the_profile_decode_compiles_eagerly():
    eng = _Engine()
    eng.num_optimization_profiles = 2  # an old build: both contexts on its prefill profile (0)
    ctx = make_contexts(eng, 0, 1234, _Rtx)
    assert list(ctx) == ["prefill", "decode"] and ctx["prefill"] is not ctx["decode"]
    assert ctx["prefill"].profile == ctx["decode"].profile == (0, 1234)
    assert ctx["prefill"].config is None  # the library's default: lazy
    assert ctx["decode"].config.dynamic_shapes_kernel_specialization_strategy == "EAGER"
    plain = make_contexts(_Engine(), 0, 7, _ClassicTrt)
    assert plain["decode"].config is None and plain["decode"].profile == (0, 7)


def test_context_failures_are_build_errors():
    with pytest.raises(BuildError, match="refused optimization profile 1 for the prefill"):
        make_contexts(_Engine(), 1, 0, _Rtx)
    with pytest.raises(BuildError, match="refused optimization profile 0"):
        make_contexts(_Engine(accept=False), 0, 0, _Rtx)
    with pytest.raises(BuildError, match="could not create the prefill execution context"):
        make_contexts(_Engine(create=False), 0, 0, _Rtx)
