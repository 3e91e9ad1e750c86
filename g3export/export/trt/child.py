"""Run a build step in a fresh Python process that imports THIS g3export (engine.build_engine with
isolate=True).

Why a child: the libtensorrt_rtx.so fix may need LD_LIBRARY_PATH at process start (library.py),
and the child's peak RSS is the TensorRT builder's own, without the parent's model and graph
(`EngineInfo.peak_rss_mb`; BENCHMARKS.md §4).

How it is started: `python -I -c <bootstrap> <package root> <request> <result>` with the working
directory set to a private temporary directory. `-I` (isolated mode) keeps the current directory,
the script's directory, PYTHONPATH and the user site out of sys.path; the bootstrap then puts the
directory that holds the running `g3export` package first on sys.path. So the child imports the
same g3export as the parent, never a `g3export/` directory that happens to be in the user's
working directory (`python -m g3export...` would have imported that one), and never another
version on PYTHONPATH. The request and the result are JSON files; `target` names a function
`module:function` taking the request dict and returning a JSON-able dict.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ...errors import BuildError

# argv: root, target, request path, result path
_BOOTSTRAP = (
    "import importlib, json, sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "mod, _, fn = sys.argv[2].partition(':')\n"
    "req = json.loads(open(sys.argv[3]).read())\n"
    "res = getattr(importlib.import_module(mod), fn)(req)\n"
    "open(sys.argv[4], 'w').write(json.dumps(res))\n")


def package_root() -> Path:
    """The directory holding the `g3export` package this process runs."""
    return Path(__file__).resolve().parents[3]


class ChildFailed(BuildError):
    """The child process died or wrote no result."""


def build_in_child(target: str, request: Mapping[str, Any], env: Mapping[str, str],
                   what: str) -> dict[str, Any]:
    """Run `target(request)` in a fresh isolated interpreter (module docstring) and return its
    result dict. Raises ChildFailed naming `what` when the process fails."""
    with tempfile.TemporaryDirectory(prefix="g3export-trt-") as td:
        req, res = Path(td) / "request.json", Path(td) / "result.json"
        req.write_text(json.dumps(dict(request)))
        proc = subprocess.run([sys.executable, "-I", "-c", _BOOTSTRAP, str(package_root()),
                               target, str(req), str(res)], env=dict(env), cwd=td)
        if proc.returncode != 0 or not res.exists():
            raise ChildFailed(f"{what} failed in its child process (exit status "
                              f"{proc.returncode})")
        return json.loads(res.read_text())
