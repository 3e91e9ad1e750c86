"""Block-wise weight quantization (DESIGN §3.9), numpy only: per-tensor functions that the export
(and the weight stream) call on one weight at a time, and the byte layouts each runtime reads.

The scheme. A Linear weight W is [N, K] (out, in: PyTorch's nn.Linear layout); y = x @ W^T
reduces over K. It is cut into blocks of `block` consecutive elements along K, each with one
float scale; symmetric (no zero point; asymmetric below):

    scale[n, b] = max_k |W[n, b*block + k]| / qmax        qmax = 2^(bits-1) - 1  (7 or 127)
    q[n, k]     = round(W[n, k] / scale[n, k // block])    in [-qmax, qmax]
    W~[n, k]    = q[n, k] * scale[n, k // block]           |W~ - W| <= scale / 2, every element

Why symmetric and qmax = 7 (not the 16 levels an int4 nibble has): it gives the half-step bound
above for every element with no clipping (a scale of amax/8 clips the one value at +amax), one
layout works for every runtime below (unsigned with the default zero point 2^(bits-1) for ORT,
signed for ONNX DequantizeLinear), and a block row never depends on another row, so a weight can
be quantized row block by row block as it streams (`quantize_rows` on any slice of rows).
Blocks all-zero get scale 0 (and codes 0): exact.

Asymmetric (`symmetric=False`, `--quant-asymmetric`, ONNX Runtime only; see below): unsigned codes
0..2^bits-1 with one integer zero point z per block, the grid covering the block's [min, max]
(widened to hold 0, which every such grid does):

    lo, hi      = min(0, min_k W), max(0, max_k W)   over the block
    scale[n, b] = f * (hi - lo) / (2^bits - 1)       zero[n, b] = round(-lo / scale)
    u[n, k]     = clip(round(W / scale) + zero, 0, 2^bits - 1)
    W~[n, k]    = (u[n, k] - zero) * scale

f is chosen per block among `SEARCH` (1.0, 0.985, ..., 0.865) as the one whose grid gives the
block the least squared error (a slightly finer grid that clips an outlier often fits the rest
better; f = 1 is the min/max grid, whose error is <= scale / 2 for every element, so the chosen
grid's block error is never above that one's). All 16 levels are used and the grid follows a
skewed block: the step is at most (hi - lo)/15 where the symmetric one is 2 amax/14.
On the real 270M's weights (relative RMS error, int4 block 32, `benchmarks/quant_grid_error.py`
on two layers and the embedding): symmetric 0.098-0.118, ONNX Runtime's symmetric
[-8, 7] grid (scale = signed amax / -8, what GenAI's builder writes) 0.085-0.118, min/max
asymmetric 0.081-0.092, searched asymmetric 0.072-0.087.
Symmetric int4 for ONNX Runtime (`quantize_rows_full`, int4's default there): all 16 codes
[-8, 7], no zero point, the scale searched per block (p = the block's signed largest-magnitude
value, on code -8, times a factor of SEARCH, or p / 7 as above): relative RMS error 0.075-0.100
on the same weights, below ONNX Runtime's own symmetric grid everywhere.
Measured on the real 270M (BENCHMARKS §10, `g3export eval`, 600 tokens): int4 block 32, mean
KL against fp32 0.488 for this searched [-8, 7] grid, 0.307 asymmetric (searched; 0.335 with
the plain min/max grid), 0.554 symmetric amax/7; perplexity 34.6, 28.0, 37.1 (fp32 20.5); ONNX
Runtime GenAI's int4 build of the same weights: KL 0.508, perplexity 34.2. Asymmetric is the
better grid, but its MatMulNBits reads zero points, and on a CPU without AVX-512 (the AMD EPYC
of 2026-12-02, AVX2 only) that kernel took 1.22x the symmetric one's time (ORT's profiler,
decode step of the 270M: 19.1 vs 15.7 ms over the 73 MatMulNBits), the decode 0.86x GenAI
int4's against 0.98x symmetric (benchmarks/compare_ort_genai.py, BENCHMARKS section 1.4); on an
AVX-512 machine the two were equally fast. Hence int4's default for ONNX Runtime is symmetric:
GenAI's speed at a KL no worse than GenAI's, with `--quant-asymmetric` the quality option.
int8 stays on quantize_rows' amax/127 grid (its KL is already 0.003, and that is the GGUF's
own Q8_0 grid). The TensorRT DequantizeLinear path is quantize_rows (positive scales, no zero
point: TensorRT's weight-only GEMMs take none).

Layouts (functions named after what reads them):

* `matmul_nbits(w)`: ONNX Runtime's `com.microsoft.MatMulNBits` (contrib spec): B uint8
  [N, K/block, block*bits/8], codes + 2^(bits-1) (the zero point the op assumes when none is
  given: 8 for 4 bits, 128 for 8), two 4-bit codes per byte, the element with the lower k in
  the low nibble; scales [N, K/block] (row n's blocks consecutive, the op's [N * K/block] order).
* `gather_block_quantized(w)`: `com.microsoft.GatherBlockQuantized` with gather_axis 0 and
  quantize_axis 1 (the only layout its CPU kernel takes for uint8 data): data [rows, K*bits/8],
  the same bytes as matmul_nbits' B, so a tied embedding can share one quantized copy.
* zero points (asymmetric): MatMulNBits takes them as uint8 [N * ceil(n_blocks * bits / 8)]
  (row n's zero points packed like its codes, two per byte for 4 bits, each row padded to a
  whole byte); GatherBlockQuantized with quantize_axis 2 (g3export.export.onnx_quant's view of
  the shared table) takes them one per byte, [rows, n_blocks, 1]: `zero_points_nbits` and
  `zero_points_gather` write the two.
* `dequantize_linear(w)`: standard ONNX DequantizeLinear (opset 21, blocked), for TensorRT: the
  signed codes transposed to [K, N] (int8 numpy; stored as ONNX INT4/INT8), scales [K/block, N],
  axis 0, block_size = block: DequantizeLinear(q, scales) is W^T, the MatMul's B.
  Streamed into the [K, N] layout by g3export.export.quant_stream (`pack_int4_signed` is ONNX
  INT4's byte layout).

FP8 (`--quant fp8`, TensorRT only; graph: g3export.export.onnx_fp8): E4M3FN (max 448), not
block-wise. `quantize_fp8_rows(w)`: one scale per output channel, amax_n / 448 (rows
independent, so it streams like the rest); activations: one static per-tensor scale
`fp8_scale(amax)` from calibration (g3export.export.calibrate). Round to nearest even,
saturating at +-448 (`to_fp8`), as ONNX QuantizeLinear with saturate=1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError

BLOCKS = (32, 64, 128)
WEIGHT_ONLY = {"int4": 4, "int8": 8}
SCHEMES = (*WEIGHT_ONLY, "fp8")
DEFAULT_BLOCK = 32


class QuantError(UserError, ValueError):
    """A quantization option that cannot apply to this model or target."""


@dataclass(frozen=True)
class QuantScheme:
    """What a quantized build did: recorded in the manifest's `quantization` section.

    scheme: int4 | int8 (weight-only, block-wise) | fp8 (E4M3 weights and activations);
    block: the block along K (weight-only); embedding: whether the tied embedding / lm_head is
    quantized too; calibration: the text fp8's activation scales came from (name + sha256)."""

    scheme: str
    block: int | None = DEFAULT_BLOCK
    embedding: bool = True
    calibration: dict | None = None
    symmetric: bool | None = None  # None: the default of the scheme and target (`resolve`)

    def resolve(self, target: str) -> "QuantScheme":
        """The scheme with `symmetric` decided: symmetric unless asked (int4's choice measured,
        module docstring). An explicit asymmetric request for a TensorRT target is a QuantError
        (its DequantizeLinear path takes no zero point)."""
        from dataclasses import replace

        if self.scheme not in WEIGHT_ONLY:
            return replace(self, symmetric=True)
        if target != "onnx":
            if self.symmetric is False:
                raise QuantError("--quant-asymmetric is for --target onnx (ONNX Runtime's "
                                 "MatMulNBits); the TensorRT targets quantize symmetrically")
            return replace(self, symmetric=True)
        if self.symmetric is None:
            return replace(self, symmetric=True)
        return self

    @property
    def bits(self) -> int:
        return WEIGHT_ONLY.get(self.scheme, 8)

    def to_dict(self) -> dict:
        if self.scheme == "fp8":
            return fp8_dict(self)
        d = asdict(self)
        d["bits"] = self.bits
        d["symmetric"] = True if self.symmetric is None else self.symmetric
        d["zero_points"] = not d["symmetric"]
        d["quantized"] = ["decoder linear layers (q/k/v/o, gate/up/down)"] + (
            ["tied embedding and lm_head"] if self.embedding else [])
        d["kept"] = ["norms", "RoPE", "vision tower"] + ([] if self.embedding else
                                                          ["tied embedding and lm_head"])
        return d


# What an fp8 build quantizes and keeps, and why (DESIGN §3.9 "FP8"; the manifest says it).
FP8_QUANTIZED = ["decoder linear layers (q/k/v/o, gate/up/down): E4M3 weights, one scale per "
                 "output channel; E4M3 inputs, one static per-tensor scale from calibration"]
FP8_KEPT = ["embedding lookup and lm_head (one table read by both; the logits' precision)",
            "attention (QK^T, softmax, PV) and the KV cache", "norms", "RoPE", "vision tower"]


def fp8_dict(scheme: "QuantScheme") -> dict:
    """The manifest's `quantization` section of an fp8 build."""
    return {"scheme": "fp8", "bits": 8, "format": FP8_FORMAT, "block": None,
            "embedding": False, "symmetric": True,
            "weights": "per output channel (amax / 448), static",
            "activations": "per tensor, static (calibrated amax / 448)",
            "quantized": list(FP8_QUANTIZED), "kept": list(FP8_KEPT),
            "calibration": dict(scheme.calibration) if scheme.calibration else None}


def fp8_min_compute_capability(ccs) -> None:
    """FP8 GEMMs need compute capability 8.9 (Ada) or newer: refuse an older --compute-capability
    (TensorRT-RTX 1.7 says "Cannot compile for target(s) sm86, because the model contains
    HW-specific datatypes: fp8_e4m3")."""
    old = [c for c in ccs or () if tuple(int(x) for x in c.split(".")) < (8, 9)]
    if old:
        raise QuantError(f"--quant fp8 needs compute capability 8.9 or newer (FP8 tensor cores); "
                         f"drop --compute-capability {', '.join(old)} or use --quant int8/int4")


def read_calibration(path) -> dict:
    """The calibration text's identity for the manifest ({name, sha256, chars}); the default is
    the public-domain text shipped in g3export/data. A missing or non-UTF-8 file -> QuantError."""
    import hashlib
    from pathlib import Path

    p = Path(path) if path is not None else default_text()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuantError(f"calibration file {p} not found; give an existing UTF-8 text file "
                         "(or omit --calibration for the default text)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QuantError(f"calibration file {p} cannot be read as UTF-8 text ({e})") from None
    if not text.strip():
        raise QuantError(f"calibration file {p} is empty; give a text to calibrate on (or omit "
                         "--calibration for the default text)")
    return {"name": p.name, "path": str(p), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "chars": len(text)}


def default_text():
    """The short public-domain English text shipped with the package (calibration and eval)."""
    from importlib import resources

    return resources.files("g3export") / "data" / "eval_text.txt"


def check_scheme(scheme: QuantScheme, target: str, dims: dict[str, int]) -> None:
    """Refuse, with a one-line QuantError, a scheme that cannot apply. dims: name -> every K that
    gets quantized (hidden_size, intermediate_size, ...), each must be a multiple of the block."""
    if scheme.scheme not in SCHEMES:
        raise QuantError(f"unknown --quant {scheme.scheme!r}; use one of: {', '.join(SCHEMES)}")
    if scheme.scheme == "fp8":
        if target == "onnx":
            raise QuantError("--quant fp8 is for the TensorRT targets (--target trt or trt-rtx); "
                             "for ONNX Runtime use --quant int8 or int4")
        return
    if scheme.block not in BLOCKS:
        raise QuantError(f"--quant-block {scheme.block} is not supported; use one of "
                         f"{', '.join(map(str, BLOCKS))}")
    for name, k in dims.items():
        if k % scheme.block:
            raise QuantError(f"--quant-block {scheme.block} does not divide the model's {name} "
                             f"({k}); choose a block that does ({', '.join(str(b) for b in BLOCKS if k % b == 0) or 'none of ' + str(BLOCKS)})")


def quant_dims(text_cfg) -> dict[str, int]:
    """Every K (reduction dim) a decoder linear layer or the lm_head has, by name."""
    t = text_cfg
    return {"hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "attention width (heads x head_dim)": t.num_attention_heads * t.head_dim}


def _check(w: np.ndarray, bits: int, block: int) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [N, K] weight, got shape {w.shape}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if w.shape[1] % block:
        raise ValueError(f"K={w.shape[1]} is not a multiple of the block {block}")


def quantize_rows(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (signed codes int8 [N, K] in [-qmax, qmax], scales float32 [N, K/block]).
    Rows are independent: quantizing a slice of rows gives that slice of the result."""
    _check(w, bits, block)
    qmax = (1 << (bits - 1)) - 1
    n, k = w.shape
    wb = np.asarray(w, dtype=np.float32).reshape(n, k // block, block)
    scales = np.abs(wb).max(axis=2) / np.float32(qmax)
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.clip(np.rint(wb / safe[:, :, None]), -qmax, qmax).astype(np.int8)
    return q.reshape(n, k), scales.astype(np.float32)


# the scale candidates of the asymmetric search: (hi - lo) / (2^bits - 1) times each
SEARCH = tuple(1 - 0.015 * i for i in range(10))


def quantize_rows_full(w: np.ndarray, bits: int, block: int, search=SEARCH
                       ) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (signed codes int8 [N, K] in [-2^(bits-1), 2^(bits-1) - 1], scales
    float32 [N, K/block], of either sign): the symmetric grid over all 2^bits codes, for ONNX
    Runtime's MatMulNBits without zero points (int4's default there; module docstring). Per
    block, with p its signed largest-magnitude value, the scale is the candidate of least
    squared error among p / -2^(bits-1) * f for f in `search` (p on the code -8 and the grid
    reaching one step further on p's side: f = 1 is ONNX Runtime's / GenAI's own grid) and
    p / (2^(bits-1) - 1) (quantize_rows' grid, so the block error is never above its). Rows are
    independent."""
    _check(w, bits, block)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    n, k = w.shape
    wb = np.asarray(w, dtype=np.float32).reshape(n, k // block, block)
    peak = np.take_along_axis(wb, np.abs(wb).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]

    def grid(scales):
        scales = scales.astype(np.float32)
        safe = np.where(scales != 0, scales, np.float32(1))
        q = np.clip(np.rint(wb / safe[:, :, None]), lo, hi)
        return np.square(q * scales[:, :, None] - wb).sum(axis=2), q, scales

    candidates = [peak / np.float32(lo) * np.float32(f) for f in search] + [peak / np.float32(hi)]
    q, scales = _least_error(grid(c) for c in candidates)  # one grid's codes at a time
    return q.astype(np.int8).reshape(n, k), scales


def _least_error(candidates):
    """Per block, the arrays of the candidate grid with the least squared error (the first one on
    a tie): candidates yields (err [N, n_blocks], *arrays), each array [N, n_blocks] or
    [N, n_blocks, block]. Returns the arrays."""
    best = None
    for err, *arrays in candidates:
        if best is None:
            best = [err, *arrays]
            continue
        better = err < best[0]
        best = [np.where(better.reshape(better.shape + (1,) * (a.ndim - 2)), a, b)
                for a, b in zip((err, *arrays), best)]
    return best[1:]


def _asym_grid(wb: np.ndarray, lo: np.ndarray, scales: np.ndarray, top: int):
    safe = np.where(scales > 0, scales, np.float32(1))
    zero = np.clip(np.rint(-lo / safe), 0, top)
    u = np.clip(np.rint(wb / safe[:, :, None]) + zero[:, :, None], 0, top)
    err = np.square((u - zero[:, :, None]) * scales[:, :, None] - wb).sum(axis=2)
    return u, zero, err


def quantize_rows_asym(w: np.ndarray, bits: int, block: int, search=SEARCH
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, K] float -> (unsigned codes uint8 [N, K] in [0, 2^bits - 1], scales float32
    [N, K/block], zero points uint8 [N, K/block]) (module docstring). Each block's scale is the
    candidate of `search` (factors of the min/max scale; (1.0,) = plain min/max) whose grid
    gives the block the least squared error. Rows are independent."""
    _check(w, bits, block)
    top = (1 << bits) - 1
    n, k = w.shape
    wb = np.asarray(w, dtype=np.float32).reshape(n, k // block, block)
    lo = np.minimum(wb.min(axis=2), 0)
    span = (np.maximum(wb.max(axis=2), 0) - lo) / np.float32(top)

    def grid(scales):
        u, zero, err = _asym_grid(wb, lo, scales, top)
        return err, u, zero, scales

    u, zero, scales = _least_error(grid((span * np.float32(f)).astype(np.float32)) for f in search)
    return u.astype(np.uint8).reshape(n, k), scales.astype(np.float32), zero.astype(np.uint8)


def dequantize_rows(q: np.ndarray, scales: np.ndarray, block: int,
                    zero_points: np.ndarray | None = None) -> np.ndarray:
    """The inverse map: [N, K] codes and [N, K/block] scales (and zero points: unsigned codes)
    -> float32 [N, K]."""
    n, k = q.shape
    qb = q.reshape(n, k // block, block).astype(np.float32)
    if zero_points is not None:
        qb = qb - zero_points[:, :, None].astype(np.float32)
    return (qb * scales[:, :, None]).reshape(n, k)


def pack_unsigned(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes [N, K] -> ORT's unsigned bytes [N, K*bits/8]: code + 2^(bits-1), packed by
    `pack_codes`."""
    return pack_codes((q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8), bits)


def pack_codes(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [N, K] -> bytes [N, ceil(K*bits/8)]; for 4 bits element 2i in the low
    nibble of byte i and 2i+1 in the high nibble (an odd K pads the last high nibble with 0)."""
    u = np.asarray(u, dtype=np.uint8)
    if bits == 8:
        return u
    if u.shape[1] % 2:
        u = np.concatenate([u, np.zeros((u.shape[0], 1), np.uint8)], axis=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def zero_points_nbits(zero: np.ndarray, bits: int) -> np.ndarray:
    """Zero points [N, K/block] -> MatMulNBits' uint8 [N * ceil(K/block * bits/8)]."""
    return pack_codes(zero, bits).reshape(-1)


def zero_points_gather(zero: np.ndarray) -> np.ndarray:
    """Zero points [rows, K/block] -> GatherBlockQuantized's (quantize_axis 2) [rows, K/block, 1]."""
    return np.ascontiguousarray(zero, dtype=np.uint8)[:, :, None]


def unpack_unsigned(b: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_unsigned (for tests and readers): bytes [N, K*bits/8] -> int8 codes."""
    if bits == 8:
        return (b.astype(np.int16) - 128).astype(np.int8)
    lo, hi = b & 0x0F, b >> 4
    u = np.stack([lo, hi], axis=-1).reshape(b.shape[0], -1)
    return (u.astype(np.int16) - 8).astype(np.int8)


def matmul_nbits(w: np.ndarray, bits: int, block: int, symmetric: bool = True) -> tuple:
    """[N, K] weight -> (B uint8 [N, K/block, block*bits/8], scales float32 [N, K/block]) for
    com.microsoft.MatMulNBits(x, B, scales) with attributes K, N, bits, block_size; with
    symmetric=False a third array, the zero points (`zero_points_nbits`), its fourth input."""
    n, k = w.shape
    if symmetric:
        q, scales = (quantize_rows_full if bits == 4 else quantize_rows)(w, bits, block)
        return pack_unsigned(q, bits).reshape(n, k // block, block * bits // 8), scales
    u, scales, zero = quantize_rows_asym(w, bits, block)
    return (pack_codes(u, bits).reshape(n, k // block, block * bits // 8), scales,
            zero_points_nbits(zero, bits))


def gather_block_quantized(w: np.ndarray, bits: int, block: int, symmetric: bool = True) -> tuple:
    """[rows, K] table -> (data uint8 [rows, K*bits/8], scales float32 [rows, K/block]) for
    com.microsoft.GatherBlockQuantized(data, ids, scales) with gather_axis 0, quantize_axis 1;
    symmetric=False adds the zero points as that op reads them with quantize_axis 1: packed like
    the data, [rows, ceil(K/block * bits/8)]."""
    if symmetric:
        b, scales = matmul_nbits(w, bits, block)
        return b.reshape(b.shape[0], -1), scales
    u, scales, zero = quantize_rows_asym(w, bits, block)
    return pack_codes(u, bits), scales, pack_codes(zero, bits)


def dequantize_linear(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] weight -> (signed codes int8 [K, N], scales float32 [K/block, N]) for ONNX
    DequantizeLinear(q, scales, axis=0, block_size=block) (opset 21) = W~^T, the MatMul's B."""
    q, scales = quantize_rows(w, bits, block)
    return np.ascontiguousarray(q.T), np.ascontiguousarray(scales.T)


# FP8 (E4M3FN) for the TensorRT targets (DESIGN §3.9, "FP8"): weights per output channel,
# activations per tensor with a static scale from calibration (g3export.export.calibrate).
# 448 is E4M3FN's largest finite value; values are scaled so the largest |x| lands on it.
FP8_MAX = 448.0
FP8_FORMAT = "float8_e4m3fn"


def fp8_scale(amax: float) -> float:
    """The per-tensor scale that maps |x| <= amax onto E4M3's range (1.0 for an all-zero tensor)."""
    return float(amax) / FP8_MAX if amax > 0 else 1.0


def to_fp8(x: np.ndarray) -> np.ndarray:
    """float32 -> E4M3FN (ml_dtypes), rounding to nearest even and saturating at +-448 as ONNX
    QuantizeLinear does (saturate=1): a plain cast would turn an overflow into NaN."""
    import ml_dtypes

    return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, float]:
    """A tensor -> (E4M3 values as ml_dtypes.float8_e4m3fn, its per-tensor scale)."""
    s = fp8_scale(float(np.abs(w).max()))
    return to_fp8(np.asarray(w, np.float32) / np.float32(s)), s


def quantize_fp8_rows(w: np.ndarray, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (E4M3 codes [N, K], scales [N] in scale_dtype): one scale per output
    channel (row n), amax_n / 448, rounded to scale_dtype (the graph's float type, which is
    DequantizeLinear's output type) BEFORE the codes are computed, so codes * stored scale is
    what the graph computes; a row whose rounded scale fell below amax/448 saturates at 448.
    Rows are independent (a slice of rows quantizes to that slice). All-zero rows: scale 1."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [N, K] weight, got shape {w.shape}")
    amax = np.abs(w).max(axis=1)
    scales = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(scale_dtype)
    return to_fp8(w / scales.astype(np.float32)[:, None]), scales


def dequantize_fp8_rows(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The inverse map: E4M3 codes [N, K] and scales [N] -> float32 [N, K]."""
    return q.astype(np.float32) * np.asarray(scales, np.float32)[:, None]


def pack_int4_signed(q: np.ndarray) -> np.ndarray:
    """Signed codes [..., 2m] -> ONNX INT4 bytes [..., m]: element 2i in the low nibble of byte
    i, two's complement (the layout of an ONNX INT4 tensor's raw data, flattened row-major)."""
    u = q.astype(np.uint8) & 0x0F
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
