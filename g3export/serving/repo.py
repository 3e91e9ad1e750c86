"""Write a Triton Inference Server model repository that serves a build (DESIGN §3.8).

    write_repository("builds/270m", "repo")      # repo/gemma3/{config.pbtxt, 1/model.py}

The model `gemma3` is a decoupled Python-backend model (one response per generated token, then
FINAL) following Triton's generate extension; its inputs and outputs are described in
g3export.serving.requests and g3export.serving.triton_model. max_batch_size is 0: Triton does not
batch requests for this model, the scheduler inside it does (continuous batching over
`max_batch` slots), so one instance (count 1) holds the one session and its cache.

Where the build is: the `build_dir` parameter of config.pbtxt. By default the absolute path of
BUILD_DIR; `build_path` writes another one (the path where a container mounts the build, e.g.
/build), and `copy_build` copies the build into the repository (gemma3/build, a relative path
resolved from the model's directory) for a repository that travels alone. Referencing rather than
copying is the default: builds are large (the 270M fp32 is 1 GiB, a 12B several GiB), while the
repository is two small files a user copies into their own deployment.

model.py is one import: the model's code is the installed g3export's, so the repository never
holds a stale copy (the container needs `pip install g3export`, documented in the README).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..export.manifest import BuildError, load_build

MODEL_NAME = "gemma3"

MODEL_PY = '''"""Triton Python-backend model `gemma3`, written by `g3export triton-repo`.

The code is g3export's (pip install g3export); see g3export/serving/triton_model.py."""

from g3export.serving.triton_model import TritonPythonModel  # noqa: F401
'''


def config_pbtxt(build_dir: str, kind: str, max_batch: int, provider: str, has_vision: bool,
                 max_queue: int = 64, default_max_tokens: int = 128) -> str:
    def inp(name, dtype, dims):
        return f'  {{ name: "{name}" data_type: {dtype} dims: [ {dims} ] optional: true }}'

    inputs = [inp("text_input", "TYPE_STRING", 1), inp("input_ids", "TYPE_INT64", -1),
              inp("chat_template", "TYPE_BOOL", 1), inp("max_tokens", "TYPE_INT32", 1),
              inp("temperature", "TYPE_FP32", 1), inp("top_k", "TYPE_INT32", 1),
              inp("top_p", "TYPE_FP32", 1), inp("seed", "TYPE_INT64", 1),
              inp("stream", "TYPE_BOOL", 1)]
    if has_vision:
        inputs.append(inp("image", "TYPE_STRING", -1))
    params = {"build_dir": build_dir, "max_batch": max_batch, "provider": provider,
              "max_queue": max_queue, "default_max_tokens": default_max_tokens}
    param_lines = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                            for k, v in params.items())
    return (f'name: "{MODEL_NAME}"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            "input [\n" + ",\n".join(inputs) + "\n]\n"
            "output [\n"
            '  { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },\n'
            '  { name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n'
            f"instance_group [ {{ count: 1 kind: {kind} }} ]\n{param_lines}\n")


def write_repository(build_dir: str | Path, out: str | Path, max_batch: int = 8,
                     provider: str = "cpu", build_path: str | None = None,
                     copy_build: bool = False, force: bool = False, max_queue: int = 64,
                     default_max_tokens: int = 128) -> Path:
    """Write OUT/gemma3/{config.pbtxt, 1/model.py}; return OUT. See the module docstring."""
    build = load_build(build_dir)  # refuse a broken build now, not when the server loads it
    if max_batch < 1:
        raise BuildError(f"max_batch must be >= 1, got {max_batch}")
    if build_path and copy_build:
        raise BuildError("give build_path or copy_build, not both")
    out = Path(out)
    model = out / MODEL_NAME
    if model.exists():
        if not force:
            raise BuildError(f"{model} exists; pass --force to replace it")
        shutil.rmtree(model)
    (model / "1").mkdir(parents=True)
    path = build_path or str(Path(build_dir).resolve())
    if copy_build:
        shutil.copytree(build_dir, model / "build")
        path = "build"
    gpu = provider == "cuda" or build.target != "onnx"
    (model / "config.pbtxt").write_text(config_pbtxt(
        path, "KIND_GPU" if gpu else "KIND_CPU", max_batch, provider, build.config.has_vision,
        max_queue, default_max_tokens))
    (model / "1" / "model.py").write_text(MODEL_PY)
    return out
