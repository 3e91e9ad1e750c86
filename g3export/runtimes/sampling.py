"""Sampling: greedy, or temperature / top-k / top-p with a seeded generator (numpy, no torch).

Follows transformers' order of logits processing: temperature, then top-k, then top-p (keep the
smallest set of most likely tokens whose probability reaches top_p; the most likely always stays).

Numerics: the row is shifted by its maximum BEFORE dividing by the temperature, (x - max) / T, so
every scaled logit is <= 0 and the most likely one is exactly 0: exp() never overflows and the sum
is >= 1 for any finite temperature > 0, including denormal ones (x / 1e-320 is inf, and inf - inf
is the NaN that broke sampling before). Logits must be finite (the generation loop checks them).
Bad settings are a SamplingError (a UserError): temperature must be finite and > 0, top_p a finite
number in (0, 1], top_k >= 0, seed >= 0 (numpy refuses negative seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from ..errors import UserError


class SamplingError(UserError, ValueError):
    """A sampling setting that cannot be used; the message says which and what is allowed."""


@dataclass(frozen=True)
class SamplingConfig:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1.0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SamplingError(f"temperature must be a finite number > 0, got {self.temperature} "
                                "(use --greedy for argmax)")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise SamplingError(f"seed must be >= 0, got {self.seed}")


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> token ids [B] (int64)."""
        if self.cfg.greedy:
            return np.argmax(logits, axis=-1).astype(np.int64)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int64)

    def _sample_row(self, row: np.ndarray) -> int:
        x = row.astype(np.float64)
        with np.errstate(over="ignore"):  # a tiny temperature sends the others to -inf: wanted
            x = (x - x.max()) / self.cfg.temperature  # <= 0, max exactly 0: module docstring
        k = self.cfg.top_k
        if 0 < k < x.size:
            kth = np.partition(x, -k)[-k]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x)
        p /= p.sum()
        if self.cfg.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = cum - p[order] < self.cfg.top_p  # a token stays if the mass before it is < top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))
