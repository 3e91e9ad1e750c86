"""The one base class of every error a user can cause (DESIGN §3; issue: bad input gets a clear
error). Anything raised as a `UserError` is bad input, not a bug: its message says what was wrong
and what to do, in one line, and the CLI prints exactly that and exits non-zero (no traceback;
`g3export --debug ...` shows one). Every module's own error type (ConfigError, CheckpointError,
BuildError, ...) derives from it, so callers catch one type.

Errors from libraries we hand user files to (ONNX Runtime, TensorRT, safetensors, gguf, Pillow)
are wrapped where they arise, naming the file, and re-raised as the module's `UserError`
subclass (`raise XError(f"{path}: ...") from e`).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, an option, a request): the message says what and what to do."""


# The error types that two modules share live here, so neither imports the other for them.

class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do.
    (Raised by g3export.modeling.weights and .embedded.)"""


class BuildError(UserError, RuntimeError):
    """A build directory that cannot be used (or written); the message says what to do.
    (The build format's error: g3export.export.manifest, and the exporters and runtimes.)"""
