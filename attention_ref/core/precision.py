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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["EXACT", "PRECISIONS", "UNIT_ROUNDOFF", "Rounding", "round_to", "round_to_bfloat16"]

#: The precisions a computation may round to.
PRECISIONS = ("float64", "float32", "float16", "bfloat16")

#: Unit roundoff u = 2^-p of each precision (p significant bits: 53, 24, 11, 8).
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; otherwise a ``ValueError``."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    return precision


def round_to_bfloat16(x: ArrayLike) -> np.ndarray:
    """Round to the nearest bfloat16 value (ties to even), returned as float32.

    bfloat16 keeps float32's 8 exponent bits and 8 significant bits (7 stored). Rounding a
    float32 adds ``0x7FFF`` plus the lowest kept bit to its bit pattern and clears the low 16
    bits: round-to-nearest-even on the dropped half. Infinities stay infinite, values past the
    largest bfloat16 round to infinity, NaNs stay NaN.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.testing import round_to_bfloat16
    >>> round_to_bfloat16(np.array([1 + 2**-8, 1 + 3 * 2**-8, 3.14159])).tolist()  # ties to even
    [1.0, 1.015625, 3.140625]
    """
    f = np.asarray(x, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f), np.float32(np.nan), rounded).astype(np.float32)


def round_to(x: ArrayLike, precision: str) -> np.ndarray:
    """Round to the nearest value of ``precision``; float64 stays float64, the others give float32.

    Examples
    --------
    >>> from attention_ref.testing import round_to
    >>> float(round_to(0.1, "float16")), float(round_to(0.1, "bfloat16"))
    (0.0999755859375, 0.10009765625)
    """
    precision = check_precision(precision)
    if precision == "float64":
        return np.asarray(x, dtype=np.float64)
    if precision == "bfloat16":
        return round_to_bfloat16(x)
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(precision).astype(np.float32)


@dataclass(frozen=True)
class Rounding:
    r"""A rounding policy ``fl``: the precision every stage's output is rounded to.

    Parameters
    ----------
    precision : {"float64", "float32", "float16", "bfloat16"}
        The format of the values. float64 is the identity (the reference itself); the others
        compute in float32 (products accumulate in float32, as GPU kernels and PyTorch's
        low-precision eager operations do) and round each stage's output to the format.
        bfloat16 is emulated by :func:`attention_ref.testing.round_to_bfloat16`.
    scale_q_first : bool, default False
        Scale ``q`` (and round it) before the product ``q k^T`` instead of scaling the scores
        after it: FlashAttention's reference with ``reorder_ops=True``, another order of
        operations with another rounding error.

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

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if not isinstance(self.scale_q_first, (bool, np.bool_)):
            raise TypeError(f"scale_q_first must be a bool; got {self.scale_q_first!r}")

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
