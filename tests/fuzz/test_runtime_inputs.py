"""Numbers that are not numbers and files that are not files at run time (issue 15). On main:
`run` printed tokens chosen from NaN logits (argmax of NaN is token 0) and exited 0; an image or
tokenizer path that is a FIFO blocked; ONNX Runtime's errors on a damaged graph were tracebacks."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from g3export.errors import UserError
from g3export.runtimes.generate import GenerationError, generate
from g3export.runtimes.sampling import SamplingConfig
from g3export.runtimes.session import Session

from .conftest import assert_refused, invoke


class _Stub(Session):
    """A session whose logits are `bad` from step `at` on (NaN, inf, -inf)."""

    def __init__(self, config, bad, at):
        self.config, self.max_context, self.batch = config, 64, 1
        self.bad, self.at, self.step = bad, at, 0

    kv_bytes = 0

    def reset(self):
        self.step = 0

    def forward(self, input_ids, start_pos, image_features=None):
        logits = np.zeros((1, self.config.text.vocab_size), np.float32)
        logits[0, 7] = 1.0
        if self.step >= self.at:
            logits[0, 3] = self.bad
        self.step += 1
        return logits

    def forward_row(self, row, input_ids, start_pos, image_features=None):
        return self.forward(input_ids, start_pos, image_features)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("at", [0, 3])
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(greedy=False, seed=0)])
def test_non_finite_logits_stop_generation(bad, at, sampling):
    from g3export.modeling.config import preset

    s = _Stub(preset("tiny"), bad, at)
    with pytest.raises(GenerationError, match="non-finite"):
        generate(s, [2, 5, 6], 10, sampling, stop_ids=[])


@pytest.fixture(scope="module")
def nan_build(tmp_path_factory):
    """A tiny build whose final norm weight is finite but huge (3e38): the build's own weight
    check lets it through (it is a finite float), and the logits overflow to inf/NaN at run
    time. (A NaN weight is refused while the weights stream: tests/export/test_stream.py.)"""
    import torch

    from g3export.export.build import build
    from g3export.modeling.weights import build_model

    model = build_model("tiny", weights="random")
    with torch.no_grad():
        model.language_model.norm.weight.fill_(3e38)
    out = tmp_path_factory.mktemp("nan") / "b"
    build(model, None, out, max_context=32, progress=False)
    return out


def test_run_stops_on_nan_logits(nan_build):
    r = invoke("run", nan_build, "--prompt-ids", "2,5,6", "--max-new-tokens", "4")
    assert_refused(r, "non-finite")
    assert r.stdout.strip() == ""  # no token printed from NaN logits


def test_damaged_graph_is_a_build_error(tmp_path):
    from g3export.runtimes.ort_session import inference_session, session_options

    for name, data in {"garbage.onnx": b"\x08\x07garbage" * 10, "empty.onnx": b""}.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(UserError, match=name):
            inference_session(p, session_options(1), ["CPUExecutionProvider"])


def test_fifo_image_and_tokenizer_do_not_block(tmp_path):
    from g3export.runtimes.images import ImageError, load_image
    from g3export.runtimes.tokenizer import Tokenizer, TokenizerError

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="regular file"):
        load_image(fifo)
    with pytest.raises(TokenizerError, match="regular file"):
        Tokenizer.from_json_file(fifo)
    with pytest.raises(ImageError):
        load_image("/dev/zero")
    assert time.monotonic() - t0 < 2
