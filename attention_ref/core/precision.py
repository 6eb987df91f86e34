r"""Where a low-precision computation rounds: the rounding policy ``fl`` of the stages.

The reference computes in float64 and rounds nowhere beyond float64's own arithmetic. A kernel
in bfloat16 or float16 rounds the output of every stage to its format; the error budget of
``attention_ref.testing`` compares a candidate with *the reference computed that way*, the
baseline. Rather than a second implementation, the baseline is the same stages under a
:class:`Rounding` policy: every stage's output passes through ``fl``, the rounding of numerical
analysis (``fl(x)`` = x rounded to the working precision), while products accumulate in float32::

    scores = fl(scaled_scores(q, k, scale))        (A1)
    probs = fl(softmax over the allowed keys)      (A5)
    out = fl(weighted_values(dropped, v))          (A7)

In float64 (the reference) ``fl`` is :data:`EXACT`, the identity, and every result is bitwise
the reference's. The policy is the ``rounding`` field of
:class:`~attention_ref.AttentionOptions`.

A policy can also round each point to its own format, as kernels do: the inputs, the scores
(their accumulation), the weights before ``P V`` and the output (``Rounding(..., scores=...,
probs=..., output=...)``); :data:`PRESETS` mirrors PyTorch's eager bfloat16/float16,
FlashAttention 2's bfloat16/float16 kernels and FlashAttention 3's FP8 path, each cited in
``docs/precision.md``. bfloat16 and the FP8 formats are ml_dtypes' (``pip install
"attention_ref[lowp]"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "EXACT",
    "FP8_FORMATS",
    "PRECISIONS",
    "PRESETS",
    "ROUNDING_POINTS",
    "SIGNIFICANT_BITS",
    "UNIT_ROUNDOFF",
    "Rounding",
    "round_to",
    "round_to_bfloat16",
]

#: The precisions a computation may round to.
PRECISIONS = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
#: The FP8 formats (OCP): e4m3fn (max 448, no infinity: past it is NaN) and e5m2 (max 57344).
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
#: Significant bits p of each precision (the implicit bit included).
SIGNIFICANT_BITS = {
    "float64": 53,
    "float32": 24,
    "float16": 11,
    "bfloat16": 8,
    "float8_e4m3fn": 4,
    "float8_e5m2": 3,
}
#: Unit roundoff u = 2^-p of each precision.
UNIT_ROUNDOFF = {name: 2.0**-bits for name, bits in SIGNIFICANT_BITS.items()}
#: Where a policy rounds in the forward: the inputs (q, k, v, bias), the scores (A1)-(A3), the
#: weights (A5)-(A6) before ``P V``, and the output (A7).
ROUNDING_POINTS = ("inputs", "scores", "probs", "output")


def ml_dtypes_module():
    """The ``ml_dtypes`` module (bfloat16 and FP8 as NumPy dtypes); ImportError names the extra."""
    try:
        import ml_dtypes
    except ImportError as exc:
        raise ImportError(
            "bfloat16 and FP8 need the ml_dtypes package, an optional extra: "
            'pip install "attention_ref[lowp]" (or pip install ml_dtypes)'
        ) from exc
    return ml_dtypes


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; otherwise a ``ValueError``."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    return precision


def round_to_bfloat16(x: ArrayLike) -> np.ndarray:
    """Round to the nearest bfloat16 value (ties to even), returned as float32.

    bfloat16 keeps float32's 8 exponent bits and 8 significant bits (7 stored). The value is
    converted to float32, then to ``ml_dtypes.bfloat16`` (round-to-nearest-even), then back.
    Infinities stay infinite, values past the largest bfloat16 round to infinity, NaNs stay NaN.
    (``tests/test_lowp.py`` checks it bit for bit against the bit trick: add ``0x7FFF`` plus the
    lowest kept bit to the float32 pattern and clear the low 16 bits.)

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.testing import round_to_bfloat16
    >>> round_to_bfloat16(np.array([1 + 2**-8, 1 + 3 * 2**-8, 3.14159])).tolist()  # ties to even
    [1.0, 1.015625, 3.140625]
    """
    return round_to(x, "bfloat16")


def round_to(x: ArrayLike, precision: str) -> np.ndarray:
    """Round to the nearest value of ``precision``; float64 stays float64, the others give float32.

    A value is converted to float32 first (the baselines' values are float32), then to the format
    (round-to-nearest-even; bfloat16 and FP8 by ``ml_dtypes``), then back to float32. Past the
    format's largest value: infinity, except float8_e4m3fn, which has none: NaN (as
    ``ml_dtypes`` and the OCP format define it; :func:`~attention_ref.quantize_fp8` saturates
    instead).

    Examples
    --------
    >>> from attention_ref.testing import round_to
    >>> float(round_to(0.1, "float16")), float(round_to(0.1, "bfloat16"))
    (0.0999755859375, 0.10009765625)
    >>> [float(round_to(x, "float8_e4m3fn")) for x in (0.1, 300.0)]
    [0.1015625, 288.0]
    """
    precision = check_precision(precision)
    if precision == "float64":
        return np.asarray(x, dtype=np.float64)
    f = np.asarray(x, dtype=np.float32)
    if precision in ("float32", "float16"):
        with np.errstate(over="ignore"):
            return f.astype(precision).astype(np.float32)
    fmt = getattr(ml_dtypes_module(), precision)
    with np.errstate(over="ignore", invalid="ignore"):
        return f.astype(fmt).astype(np.float32)


@dataclass(frozen=True)
class Rounding:
    r"""A rounding policy ``fl``: the precision every stage's output is rounded to.

    Parameters
    ----------
    precision : {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
        The format of the values. float64 is the identity (the reference itself); the others
        compute in float32 (products accumulate in float32, as GPU kernels and PyTorch's
        low-precision eager operations do) and round each stage's output to the format.
        bfloat16 and the FP8 formats are ml_dtypes'
        (:func:`attention_ref.testing.round_to`, the ``lowp`` extra).
    scale_q_first : bool, default False
        Scale ``q`` (and round it) before the product ``q k^T`` instead of scaling the scores
        after it: FlashAttention's reference with ``reorder_ops=True``, another order of
        operations with another rounding error.
    inputs, scores, probs, output : str, optional
        The format of one rounding point (:data:`ROUNDING_POINTS`), instead of ``precision``:
        the inputs q, k, v and the bias; the scores, capped scores and logits (A1)-(A3) ("float32"
        for a kernel that keeps its accumulator); the weights (A5)-(A6), rounded before ``P V``;
        the output (A7). The backward rounds every gradient to ``precision``.

    Notes
    -----
    Where it rounds, in ``sdpa_forward``: the inputs q, k, v and the bias; the scores (A1), the
    soft-capped scores (A2), the logits (A3), the weights (A5) after the empty-row policy, the
    dropped weights (A6) and the output (A7). In ``sdpa_backward``: ``dout``, dP' (A8), dv (A9),
    dP (A10), the softmax gradient (A11), dbias (A13), the soft-cap gradient (A14), dq and dk
    (A15), (A16). Multi-head attention also rounds its inputs and weights, each projection's
    output (M1)-(M3), (M6), and every gradient of the projections (M7), (M10). The softmax
    itself runs in float32 on rounded logits, as PyTorch's low-precision softmax does.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.precision import Rounding
    >>> fl = Rounding("bfloat16")
    >>> fl(np.array([1.0 + 2**-9, 3.14159])).tolist()
    [1.0, 3.140625]
    >>> x = np.array([0.1])
    >>> Rounding("float64")(x) is x                     # the reference: fl is the identity
    True
    """

    precision: str = "float64"
    scale_q_first: bool = False
    inputs: str | None = None
    scores: str | None = None
    probs: str | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if not isinstance(self.scale_q_first, (bool, np.bool_)):
            raise TypeError(f"scale_q_first must be a bool; got {self.scale_q_first!r}")
        for point in ROUNDING_POINTS:
            fmt = getattr(self, point)
            if fmt is not None:
                if not isinstance(fmt, str) or fmt not in PRECISIONS:
                    raise ValueError(f"{point} must be None or one of {PRECISIONS}; got {fmt!r}")
                if self.exact and fmt != "float64":
                    raise ValueError(
                        f"{point}={fmt!r} needs a low precision: precision='float64' is the "
                        "reference, which rounds nowhere"
                    )

    def format_at(self, point: str) -> str:
        """The format of a rounding point (:data:`ROUNDING_POINTS`): its own or ``precision``."""
        if point not in ROUNDING_POINTS:
            raise ValueError(f"point must be one of {ROUNDING_POINTS}; got {point!r}")
        return getattr(self, point) or self.precision

    def at(self, point: str) -> Rounding:
        """The policy that rounds to :meth:`format_at` ``(point)``: ``fl`` of that point."""
        fmt = self.format_at(point)
        if fmt == self.precision:
            return self
        return Rounding(fmt if fmt != "float64" else "float32")

    @property
    def exact(self) -> bool:
        """True for float64: nothing is rounded."""
        return self.precision == "float64"

    @property
    def compute_dtype(self) -> np.dtype:
        """float64 for the reference, float32 (the accumulation precision) for the others."""
        return np.dtype(np.float64 if self.exact else np.float32)

    def __call__(self, x: Any) -> Any:
        """``x`` rounded to :attr:`precision` (None and float64 values pass unchanged)."""
        if x is None or self.exact:
            return x
        return round_to(x, self.precision)


#: The reference's policy: nothing is rounded.
EXACT = Rounding("float64")

#: Policies of real implementations (``docs/precision.md`` cites each): PyTorch's eager
#: operations in bfloat16/float16 (every stage's output rounded), FlashAttention 2's kernels
#: (float32 scores and softmax, the weights rounded to the input format before ``P V``, the
#: output in it) and FlashAttention 3's FP8 forward (inputs e4m3 with descale factors, applied in
#: float32 by :func:`~attention_ref.fp8_attention`; float32 accumulation; the normalised weights
#: rounded to e4m3 before ``P V``; the output in bfloat16).
PRESETS = {
    "pytorch_bf16": Rounding("bfloat16"),
    "pytorch_fp16": Rounding("float16"),
    "flash_attention_2_bf16": Rounding(
        "bfloat16", scores="float32", probs="bfloat16", output="bfloat16"
    ),
    "flash_attention_2_fp16": Rounding(
        "float16", scores="float32", probs="float16", output="float16"
    ),
    "flash_attention_3_fp8": Rounding(
        "float32", scores="float32", probs="float8_e4m3fn", output="bfloat16"
    ),
}
