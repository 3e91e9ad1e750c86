"""Which TensorRT library a target uses, importing it, and the libtensorrt_rtx.so fix.

    target   library               package                             GPUs
    -------  --------------------  ----------------------------------  -------------------------
    trt      TensorRT >= 10.6      pip install 'g3export[tensorrt]'    data-centre (H100...)
    trt-rtx  TensorRT for RTX 1.7  pip install 'g3export[trt-rtx]'     RTX, cc 7.5/8.0/8.6/8.9/
                                   (tensorrt-rtx-cu13==1.7.1.116)      12.0/12.1 (not 9.0)

* `require_tensorrt(target)` returns the flavour's Python module or raises `TensorRTMissing` (a
  BuildError whose message says what to install and that `--target onnx` works). Call it before
  any work so that a missing library never leaves a partial build directory. A module that
  imports but has no `Builder` is treated as missing: `tensorrt-stubs` installs a `tensorrt/`
  directory holding only `.pyi` files, which Python imports as an empty namespace package.
* TensorRT-RTX's ONNX parser `dlopen`s `libtensorrt_rtx.so` (unversioned) to create plugins and
  the wheel ships only `libtensorrt_rtx.so.1`; without the plain name the process aborts inside
  `parse` ("terminate called without an active exception"). Measured here: the parser library's
  RPATH is `$ORIGIN`, so a symlink `libtensorrt_rtx.so -> libtensorrt_rtx.so.1` beside it is found
  (even when created after `import tensorrt_rtx`); `LD_LIBRARY_PATH` set at process start works;
  setting it later in `os.environ`, or preloading the library with `ctypes` (as `.so.1` or through
  a symlink of the plain name elsewhere, RTLD_GLOBAL) does NOT (glibc matches a loaded object by
  its soname, `libtensorrt_rtx.so.1`). So `ensure_rtx_soname()` creates the symlink beside the
  wheel's library (atomically: temp name + rename); where that directory is not writable it makes
  the symlink in a private cache directory, and `build_engine` then runs the build in a child
  process whose `LD_LIBRARY_PATH` starts with that directory (`rtx_env()` gives the environment
  for any other process that must parse plugin graphs).

This module imports no onnx/onnxscript/onnx_ir and no torch: the engine runtime uses it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...errors import BuildError
from ..manifest import ENGINE_TARGETS

FLAVOURS = ENGINE_TARGETS  # the targets that build TensorRT engines

_MODULES = {"trt": "tensorrt", "trt-rtx": "tensorrt_rtx"}
_INSTALL = {
    "trt": ("TensorRT is not installed. Install TensorRT >= 10.6 for your CUDA version from "
            "NVIDIA (pip install 'g3export[tensorrt]', which needs NVIDIA's package index "
            "https://pypi.nvidia.com, or the tar/deb packages from "
            "https://developer.nvidia.com/tensorrt)"),
    "trt-rtx": ("TensorRT for RTX is not installed. Install it with: "
                "pip install 'g3export[trt-rtx]'  (tensorrt-rtx-cu13==1.7.1.116)"),
}



class TensorRTMissing(BuildError):
    """The flavour's library cannot be imported. The message says what to install."""


def check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown TensorRT flavour {flavour!r}; valid: {', '.join(FLAVOURS)}")


def library_name(flavour: str) -> str:
    """The Python module of a flavour: 'tensorrt' or 'tensorrt_rtx'."""
    check_flavour(flavour)
    return _MODULES[flavour]


def require_tensorrt(target: str) -> Any:
    """Import and return `tensorrt` (target 'trt') or `tensorrt_rtx` (target 'trt-rtx').

    Raises TensorRTMissing, before any other work, when it is not installed (or is only
    `tensorrt-stubs`). For TensorRT-RTX the unversioned-soname problem is fixed first."""
    check_flavour(target)
    name = _MODULES[target]
    hint = (f"{_INSTALL[target]}. Without it, `g3export build --target onnx` works and needs no "
            "TensorRT.")
    if importlib.util.find_spec(name) is None:
        raise TensorRTMissing(hint)
    if target == "trt-rtx":
        ensure_rtx_soname()
    try:
        mod = importlib.import_module(name)
    except (ImportError, OSError) as e:
        raise TensorRTMissing(f"{hint} (importing {name} failed: {e})") from e
    if not hasattr(mod, "Builder"):
        where = list(getattr(mod, "__path__", [])) or getattr(mod, "__file__", None)
        raise TensorRTMissing(f"{hint} (`import {name}` found only {where}, e.g. type stubs from "
                              "tensorrt-stubs, not the library)")
    return mod



# ---------------------------------------------------------------------------------------------
# libtensorrt_rtx.so


@dataclass(frozen=True)
class SonameFix:
    """How `libtensorrt_rtx.so` is made findable. method: 'present' (already there), 'symlink'
    (created beside the wheel's library), 'env' (private dir: needs LD_LIBRARY_PATH at process
    start, see `in_process`), 'none' (no tensorrt_rtx_libs package: a system install)."""

    method: str
    lib_dir: str | None
    private_dir: str | None = None

    @property
    def in_process(self) -> bool:
        """Whether this process can parse plugin graphs (the plain name is findable now)."""
        if self.method != "env":
            return True
        return self.private_dir in _startup_ld_library_path()


_SONAME = "libtensorrt_rtx.so"
_REAL = "libtensorrt_rtx.so.1"
_fix_cache: SonameFix | None = None


def _startup_ld_library_path() -> list[str]:
    """LD_LIBRARY_PATH as the dynamic loader saw it at process start (later changes to os.environ
    are ignored by the loader)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    for item in raw.split(b"\0"):
        if item.startswith(b"LD_LIBRARY_PATH="):
            return item[len(b"LD_LIBRARY_PATH="):].decode(errors="replace").split(os.pathsep)
    return []


def _rtx_lib_dir() -> Path | None:
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / _REAL).exists():
            return Path(loc)
    return None


def _private_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "g3export" / "tensorrt_rtx_soname"


def _atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: concurrent processes never see a half-made link


def ensure_rtx_soname(lib_dir: Path | None = None, private_dir: Path | None = None,
                      allow_in_place: bool = True) -> SonameFix:
    """Make `libtensorrt_rtx.so` findable by TensorRT-RTX's ONNX parser (module docstring).

    Arguments are for tests; by default the installed wheel's directory and the user's cache.
    Idempotent and cheap after the first call."""
    global _fix_cache
    default = lib_dir is None and private_dir is None and allow_in_place
    if default and _fix_cache is not None:
        return _fix_cache
    lib_dir = lib_dir if lib_dir is not None else _rtx_lib_dir()
    if lib_dir is None:
        fix = SonameFix("none", None)
    else:
        link = lib_dir / _SONAME
        if link.exists():  # follows the link: a dangling one is replaced below
            fix = SonameFix("present", str(lib_dir))
        else:
            fix_: SonameFix | None = None
            if allow_in_place and os.access(lib_dir, os.W_OK):
                try:
                    _atomic_symlink(_REAL, link)  # relative: survives moving the environment
                    fix_ = SonameFix("symlink", str(lib_dir))
                except OSError:
                    fix_ = None
            if fix_ is None:
                pdir = private_dir if private_dir is not None else _private_cache_dir()
                pdir.mkdir(parents=True, exist_ok=True)
                _atomic_symlink(str((lib_dir / _REAL).resolve()), pdir / _SONAME)
                fix_ = SonameFix("env", str(lib_dir), str(pdir))
            fix = fix_
    if default:
        _fix_cache = fix
    return fix


def rtx_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that will parse TensorRT-RTX plugin graphs."""
    env = dict(os.environ if base is None else base)
    fix = ensure_rtx_soname()
    if fix.method == "env" and fix.private_dir:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if fix.private_dir not in parts:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([fix.private_dir, *parts])
    return env
