"""Checks of the folders the benchmark scripts here are given, shared by them: a bad g3export
build or GenAI folder is a one-line argparse error (exit 2), not a traceback."""

from __future__ import annotations

import json
from pathlib import Path


def load_onnx_build(ap, build_dir):
    """The g3export ONNX build at build_dir (manifest checked, files hashed), or ap.error."""
    from g3export.errors import BuildError
    from g3export.export.manifest import load_build

    try:
        return load_build(build_dir, expect_target="onnx")
    except BuildError as e:
        ap.error(str(e))


def check_genai_dir(ap, genai_dir) -> None:
    """ap.error unless genai_dir holds a readable genai_config.json naming a model file there."""
    try:
        dec = json.loads((Path(genai_dir) / "genai_config.json").read_text())["model"]["decoder"]
        ok = (Path(genai_dir) / dec["filename"]).is_file()
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        ap.error(f"{genai_dir}: not a GenAI model folder (no readable genai_config.json naming "
                 "its model file); make one with benchmarks/compare_ort_genai.py --prepare")
