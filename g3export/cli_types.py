"""Click parameter types for the CLI's numbers and text, so every option is checked where it is
parsed (a usage error, exit 2) rather than deep inside a run (a traceback, or NaN tokens).

Why not click.FloatRange alone: it accepts `nan` (every comparison with NaN is false) and `inf`,
and `--temperature nan` sampled from NaN probabilities. Why not click.IntRange alone: its upper
bound is what keeps `--max-context 10**30` from reaching an allocation; the bounds below are far
above anything a Gemma 3 can use (131072 tokens of context, the 27B's 62 layers) and only stop
absurd values early; the real limits (the model's context, the machine's memory) are checked by
the code that knows them.
"""

from __future__ import annotations

import math

import click

# Upper bounds of integer options (see the module docstring).
MAX_TOKENS = 1 << 24        # contexts, prompt lengths, new tokens, prefill chunks
MAX_BATCH = 4096
MAX_REPEAT = 10_000
MAX_SEED = (1 << 64) - 1    # numpy's generators take any non-negative int; keep it a uint64


class FiniteFloat(click.FloatRange):
    """A finite float in a range (never NaN or inf)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


def int_range(lo: int, hi: int = MAX_TOKENS) -> click.IntRange:
    return click.IntRange(lo, hi)


TEMPERATURE = FiniteFloat(0, min_open=True)       # > 0; --greedy is argmax
TOP_P = FiniteFloat(0, 1, min_open=True)           # (0, 1]
TOP_K = click.IntRange(0, 1 << 24)                 # 0 = off
SEED = click.IntRange(0, MAX_SEED)
TOKENS = int_range(1)                              # --max-new-tokens, --max-context, ...
BATCH = int_range(1, MAX_BATCH)
REPEAT = int_range(1, MAX_REPEAT)


class Text(click.ParamType):
    """A string that is valid Unicode text. Click decodes argv with surrogate escapes, so bytes
    that are not UTF-8 arrive as lone surrogates, which the tokenizer and every encoder refuse
    later with a traceback: refuse them here, naming the option."""

    name = "text"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            value = str(value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.fail("is not valid UTF-8 text (the bytes given cannot be decoded); pass UTF-8",
                      param, ctx)
        if "\x00" in value:
            self.fail("contains a NUL character", param, ctx)
        return value


TEXT = Text()
