"""Pieces of the server path that need no running server."""

from __future__ import annotations

import numpy as np
import pytest

from g3export.modeling.config import preset
from g3export.serving import server
from g3export.serving.requests import RequestError, parse_request


def test_no_server_installed_says_what_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    with pytest.raises(server.ServerError, match=r"pip install 'g3export\[serve\]'") as e:
        server.find_tritonserver()
    assert "\n" not in str(e.value)


def test_repository_config(tmp_path):
    from g3export.serving.repo import config_pbtxt

    text = config_pbtxt("/build", "KIND_CPU", 4, "cpu", has_vision=True)
    assert "model_transaction_policy { decoupled: true }" in text and 'backend: "python"' in text
    assert "count: 1 kind: KIND_CPU" in text and '"image" data_type: TYPE_STRING' in text
    assert 'key: "build_dir" value: { string_value: "/build" }' in text


@pytest.mark.parametrize("inputs, match", [
    ({}, "exactly one"),
    ({"input_ids": np.array([2, 3]), "top_k": np.array([-1])}, "top_k"),
    ({"input_ids": np.array([2, 3]), "max_tokens": np.array([0])}, "max_tokens"),
    ({"text_input": np.array([b"hi"], dtype=object)}, "no tokenizer"),
])
def test_bad_requests(inputs, match):
    with pytest.raises(RequestError, match=match):
        parse_request(inputs, None, preset("tiny"), 16)


def test_sampling_follows_run():
    req = parse_request({"input_ids": np.array([2, 3]), "seed": np.array([5])}, None,
                        preset("tiny"), 16)
    assert req.sampling.greedy and req.max_new_tokens == 16  # a seed alone stays greedy
    req = parse_request({"input_ids": np.array([2, 3]), "top_p": np.array([0.9], np.float32),
                         "seed": np.array([5])}, None, preset("tiny"), 16)
    assert not req.sampling.greedy and req.sampling.temperature == 1.0 and req.sampling.seed == 5


def test_images_base64_only():
    cfg = preset("tiny-vision")
    for bad, match in [(b"https://example.com/cat.png", "URL"), (b"/tmp/cat.png", "path"),
                       (b"not base64!", "base64"), (b"aGVsbG8=", "image 0")]:
        with pytest.raises(RequestError, match=match):
            parse_request({"input_ids": np.array([2, 3]), "image": np.array([bad], dtype=object)},
                          None, cfg, 16)


def test_triton_repo_cli(tiny_text_build, tmp_path):
    from click.testing import CliRunner
    from g3export.cli import main

    r = CliRunner().invoke(main, ["triton-repo", str(tiny_text_build), "--out", str(tmp_path / "a"),
                                  "--max-batch", "3", "--build-path", "/build"])
    assert r.exit_code == 0, r.output
    cfg = (tmp_path / "a" / "gemma3" / "config.pbtxt").read_text()
    assert '"/build"' in cfg and 'key: "max_batch" value: { string_value: "3" }' in cfg
    assert "g3export.serving.triton_model" in (tmp_path / "a/gemma3/1/model.py").read_text()
    r = CliRunner().invoke(main, ["triton-repo", str(tiny_text_build), "--out",
                                  str(tmp_path / "a")])
    assert r.exit_code != 0 and "--force" in r.output
    r = CliRunner().invoke(main, ["triton-repo", str(tiny_text_build), "--out", str(tmp_path / "b"),
                                  "--copy-build"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b/gemma3/build/manifest.json").is_file()
    assert 'string_value: "build"' in (tmp_path / "b/gemma3/config.pbtxt").read_text()
    r = CliRunner().invoke(main, ["triton-repo", str(tmp_path / "nothing"), "--out",
                                  str(tmp_path / "c")])
    assert r.exit_code != 0 and "Traceback" not in r.output
