"""What the command modules share (g3export.cli and the modules of its commands): the one-line
error wrapper every command wears, the --size choice, loading a model for the PyTorch reference.
"""

from __future__ import annotations

import functools

import click

from .modeling.config import PRESETS


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def friendly(fn):
    """Bad input becomes `Error: <one line>` and exit 1 (click's usage errors exit 2): any
    g3export.errors.UserError (every module's error type derives from it, so there is no list to
    keep), and an OSError (a path the user gave that cannot be read or written; it names the file
    and the reason). `g3export --debug ...` re-raises instead, with the traceback."""
    from .errors import UserError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (UserError, OSError) as e:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and (ctx.find_root().params or {}).get("debug"):
                raise
            raise click.ClickException(_one_line(e)) from None
    return wrapper


SIZE = click.Choice(list(PRESETS), case_sensitive=False)


def load_model(size, checkpoint, weights, dtype="fp32", all_logits=False):
    """The PyTorch model of --size / --checkpoint (run --reference, eval --reference-torch), once
    its weights are known to fit in memory."""
    from .api import load_model as api_load_model
    from .modeling.memory import require_weight_memory

    require_weight_memory(size, checkpoint, dtype)
    return api_load_model(size, checkpoint, weights, dtype, all_logits)
