"""A multimodal build through a real tritonserver: an image sent as base64 bytes gives the tokens
generate() gives with the same image's features; a URL or a broken image gets an error."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from .conftest import assert_gone, start_server, tree
from .test_triton_server import run_all


@pytest.fixture(scope="module")
def vision_build(tmp_path_factory):
    from click.testing import CliRunner
    from g3export.cli import main

    out = tmp_path_factory.mktemp("vb") / "tiny-vision"
    r = CliRunner().invoke(main, ["build", "--size", "tiny-vision", "--weights", "random",
                                  "--target", "onnx", "--max-context", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_base64_image_through_the_server(vision_build, tmp_path, triton_install):
    from PIL import Image

    from g3export.runtimes.generate import generate
    from g3export.runtimes.images import load_images
    from g3export.runtimes.ort_session import OrtSession

    png = tmp_path / "img.png"
    pixels = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(png)
    session = OrtSession.from_build(vision_build)
    cfg = session.config
    ids = [2, 7, cfg.boi_token_id, *[cfg.image_token_id] * cfg.mm_tokens_per_image,
           cfg.eoi_token_id, 8, 9]
    feats = session.image_features(load_images([png], cfg))
    want = generate(session, ids, 6, image_features=feats).token_ids
    b64 = base64.b64encode(png.read_bytes()).decode()
    server = start_server(vision_build, tmp_path / "repo", triton_install, 2)
    procs = tree(server.proc.pid)
    try:
        got = run_all(server.url, [
            {"input_ids": ids, "image": [b64], "max_tokens": 6},
            {"input_ids": ids, "image": ["https://example.com/a.png"], "max_tokens": 6},
            {"input_ids": ids, "image": [base64.b64encode(png.read_bytes()[:60]).decode()]},
            {"input_ids": ids, "max_tokens": 6}])                      # image tokens, no image
    finally:
        server.stop()
    assert_gone(procs)
    assert got[0][0] == want
    assert "URL" in str(got[1]) and "truncated" in str(got[2]) and "0 image view" in str(got[3])
