"""`g3export.build`: the library call behind `g3export build`, with the CLI's defaults."""

from __future__ import annotations

import pytest

import g3export
from g3export.api import OptionError, default_dtype
from g3export.export.manifest import load_build


def test_defaults_per_target():
    assert default_dtype("onnx") == "fp32"
    assert default_dtype("trt") == default_dtype("trt-rtx") == "bf16"


@pytest.mark.parametrize("kwargs,words", [
    ({}, "--size or --checkpoint"),
    ({"size": "tiny", "target": "cuda"}, "unknown target"),
    ({"size": "tiny", "attention": "native"}, "options of --target trt"),
    ({"size": "tiny", "max_context": 10**6}, "beyond tiny's"),
    ({"size": "tiny", "dtype": "fp8"}, "unknown dtype"),
])
def test_option_errors_before_any_work(kwargs, words):
    with pytest.raises(OptionError, match=words):
        g3export.build(**kwargs)


def test_build_random_tiny(tmp_path):
    out = g3export.build(size="tiny", weights="random", max_context=16, out=tmp_path / "b",
                         progress=False)
    b = load_build(out)
    assert (b.target, b.dtype, b.max_context) == ("onnx", "fp32", 16)
    assert b.tokenizer is None and list(b.components) == ["text"]
