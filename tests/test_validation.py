"""Validation at the door, purity and precision of every public entry point.

What every public entry point promises (the README's "Precision" paragraph):

* bad input gets a ``ValueError``/``TypeError`` naming the argument, the expected and the actual
  value, raised by the library's own check: never a bare numpy error, never an assert;
* inputs are never modified (tested with read-only arrays) and outputs never alias them;
* everything is float64 whatever the input dtype (ints, float16/32, nested lists); ``dtype=``
  computes in another real floating precision on request.

Shapes cannot hide bugs: B > 1, H > 1, Hkv < H, T != S, Dk != Dv.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest

import attention_ref as ar
from attention_ref import MultiHeadParams

PACKAGE_DIR = Path(ar.__file__).resolve().parent

#: Precision: an int/float16/float32/list input and the float64 array of the same values go
#: through the same float64 operations on the same contiguous layout, so they should agree to
#: the last bit; 1e-12 leaves room for a different summation order and nothing more.
SAME_VALUES_RTOL = 1e-12

# Head level: q (B, H, T, DK), k (B, HKV, S, DK), v (B, HKV, S, DV).
B, H, HKV, T, S, DK, DV = 2, 4, 2, 3, 5, 6, 7
SCORES = (B, H, T, S)
OUT = (B, H, T, DV)
# Module level (cross-attention): query (B, T, D), key (B, S, KDIM), value (B, S, VDIM); per-head
# widths MDK (queries/keys) and MDV (values); output width D. Projection: (B, T, D) -> (B, T, DOUT).
D, KDIM, VDIM, MDK, MDV, DOUT = 8, 6, 5, 3, 2, 5


@pytest.fixture
def g(rng) -> SimpleNamespace:
    """Valid inputs for every entry point (float64); each test breaks or converts some of them."""
    n = rng.normal
    bias_neginf = n(size=(T, S))
    bias_neginf[1, :] = -np.inf  # query row 1 sees no key: an empty row
    bias_neginf[0, 2] = -np.inf  # one masked pair
    logits = n(size=(B, T, S))
    return SimpleNamespace(
        rng=rng,
        # scaled dot-product attention
        q=n(size=(B, H, T, DK)),
        k=n(size=(B, HKV, S, DK)),
        v=n(size=(B, HKV, S, DV)),
        dout=n(size=OUT),
        mask=rng.random(SCORES) < 0.7,  # (B, H, T, S)
        mask_ts=rng.random((T, S)) < 0.7,  # (T, S), broadcast over B and H
        bias=n(size=(H, 1, S)),  # broadcast over B and T: its gradient is a sum
        bias_full=n(size=SCORES),
        bias_neginf=bias_neginf,
        keep=rng.random(SCORES) >= 0.25,  # dropout keep-mask for p = 0.25
        xs=n(size=(B, H, S, DK)),
        dxs=n(size=(B, H, S, DK)),  # self-attention: q = k = v
        # multi-head attention
        query=n(size=(B, T, D)),
        key=n(size=(B, S, KDIM)),
        value=n(size=(B, S, VDIM)),
        mdout=n(size=(B, T, D)),
        params=ar.init_params(
            rng,
            d_model=D,
            num_heads=H,
            num_kv_heads=HKV,
            head_dim=MDK,
            v_head_dim=MDV,
            kdim=KDIM,
            vdim=VDIM,
        ),
        params_self=ar.init_params(rng, d_model=D, num_heads=H, num_kv_heads=HKV),
        params_one_head=ar.init_params(rng, d_model=D, num_heads=1),
        # projection, heads, softmax
        x=n(size=(B, T, D)),
        w=n(size=(D, DOUT)),
        b=n(size=DOUT),
        dy=n(size=(B, T, DOUT)),
        heads=n(size=(B, H, T, MDK)),
        logits=logits,
        probs=ar.softmax(logits),
        dprobs=n(size=(B, T, S)),
        dlse=n(size=(B, T)),
    )


# ----------------------------------------------------------------------------- helpers


def _arrays(obj: Any):
    """Every ndarray inside ``obj``: arrays, tuples (NamedTuples, traces), lists, dicts, params."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, MultiHeadParams):
        for f in dataclasses.fields(obj):
            yield from _arrays(getattr(obj, f.name))
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _arrays(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _arrays(item)


def _convert(
    obj: Any, f: Callable[[np.ndarray], Any], kinds: str = "f", _done: dict | None = None
) -> Any:
    """``obj`` with every array ``a`` of a dtype kind in ``kinds`` replaced by ``f(a)``.

    By default only float arrays: bool masks and scalars are left as they are. An array that
    occurs several times (self-attention) becomes one converted object, used each time.
    """
    done = {} if _done is None else _done
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in kinds:
            return obj
        if id(obj) not in done:
            done[id(obj)] = f(obj)
        return done[id(obj)]
    if isinstance(obj, MultiHeadParams):
        return dataclasses.replace(
            obj,
            **{
                fl.name: _convert(getattr(obj, fl.name), f, kinds, done)
                for fl in dataclasses.fields(obj)
            },
        )
    if isinstance(obj, tuple):
        return tuple(_convert(item, f, kinds, done) for item in obj)
    if isinstance(obj, dict):
        return {key: _convert(item, f, kinds, done) for key, item in obj.items()}
    return obj


def _with(a: np.ndarray, index, value) -> np.ndarray:
    """A copy of ``a`` with ``a[index] = value``."""
    a = a.copy()
    a[index] = value
    return a


def _msg(says: str, actual: str) -> str:
    """Regex: the message says ``says`` (naming the argument), then quotes the ``actual`` value."""
    return f"{re.escape(says)}.*{re.escape(actual)}"


class Bad(NamedTuple):
    call: Callable[[SimpleNamespace], Any]  #: calls an entry point with one bad argument
    exc: type  #: exactly this type (not a subclass such as numpy's AxisError)
    match: str  #: regex the message must match: names the argument, quotes the actual value
    name: str  #: the argument's name, which the message must contain


def _assert_clear_error(bad: Bad, g: SimpleNamespace) -> None:
    with pytest.raises(bad.exc, match=bad.match) as info:
        bad.call(g)
    exc, where = info.value, info.traceback[-1]
    assert type(exc) is bad.exc, f"{type(exc).__name__} instead of {bad.exc.__name__}: {exc}"
    assert bad.name in str(exc), f"the message does not name {bad.name!r}: {exc}"
    # Raised by a `raise` statement of attention_ref itself, not inside numpy (a bare broadcasting
    # or indexing error) nor by an operator of the library's math.
    assert Path(str(where.path)).resolve().is_relative_to(PACKAGE_DIR), (
        f"raised in {where.path}, not by attention_ref's own check: {exc}"
    )
    assert str(where.statement).lstrip().startswith("raise "), (
        f"raised by `{str(where.statement).strip()}`, not by a check: {exc}"
    )


# ----------------------------------------------------------------------------- bad inputs

# Scaled dot-product attention: (id, overrides of the valid q/k/v/options, exception, what the
# message says naming the argument, the actual value it quotes, the argument). Each case runs
# through the forward and the backward.
SDPA_BAD = [
    (
        "q-rank-2",
        lambda g: dict(q=g.q[0, 0]),
        ValueError,
        "q must have shape (..., H, T, Dk)",
        f"got shape {(T, DK)}",
        "q",
    ),
    (
        "k-rank-2",
        lambda g: dict(k=g.k[0, 0]),
        ValueError,
        "k must have shape (..., Hkv, S, Dk)",
        f"got shape {(S, DK)}",
        "k",
    ),
    (
        "v-rank-1",
        lambda g: dict(v=g.v[0, 0, 0]),
        ValueError,
        "v must have shape (..., Hkv, S, Dv)",
        f"got shape {(DV,)}",
        "v",
    ),
    (
        "q-batch-would-broadcast",
        lambda g: dict(q=g.q[:1]),
        ValueError,
        "q, k and v must have the same batch dims",
        f"q.shape={(1, H, T, DK)}",
        "q",
    ),
    (
        "v-batch",
        lambda g: dict(v=g.v[:1]),
        ValueError,
        "q, k and v must have the same batch dims",
        f"v.shape={(1, HKV, S, DV)}",
        "v",
    ),
    (
        "k-extra-batch-dim",
        lambda g: dict(k=g.k[None]),
        ValueError,
        "q, k and v must have the same batch dims",
        f"k.shape={(1, B, HKV, S, DK)}",
        "k",
    ),
    (
        "k-Dk",
        lambda g: dict(k=g.k[..., :4]),
        ValueError,
        f"k must have Dk={DK} like q",
        f"k.shape={(B, HKV, S, 4)}",
        "k",
    ),
    (
        "v-S",
        lambda g: dict(v=g.v[:, :, :4]),
        ValueError,
        f"v must have S={S} positions like k",
        f"v.shape={(B, HKV, 4, DV)}",
        "v",
    ),
    (
        "v-Hkv",
        lambda g: dict(v=g.v[:, :1]),
        ValueError,
        f"v must have Hkv={HKV} heads like k",
        f"v.shape={(B, 1, S, DV)}",
        "v",
    ),
    (
        "H-not-multiple-of-Hkv",
        lambda g: dict(q=g.q[:, :3]),
        ValueError,
        f"q's head count H=3 must be a multiple of k's Hkv={HKV}",
        f"q.shape={(B, 3, T, DK)}",
        "q",
    ),
    (
        "q-empty",
        lambda g: dict(q=g.q[:, :, :0]),
        ValueError,
        "q must not be empty",
        f"got shape {(B, H, 0, DK)}",
        "q",
    ),
    (
        "q-complex-with-real-dtype",
        lambda g: dict(q=g.q + 1j, dtype=np.float32),
        TypeError,
        "q is complex (complex128)",
        "but the compute dtype is float32",
        "q",
    ),
    (
        "k-object",
        lambda g: dict(k=g.k.astype(object)),
        TypeError,
        "k must hold real numbers",
        "got dtype object",
        "k",
    ),
    (
        "v-ragged-list",
        lambda g: dict(v=[[[[1.0, 2.0]]], [[[1.0]]]]),
        TypeError,
        "v could not be converted to a numpy array",
        "inhomogeneous",
        "v",
    ),
    (
        "q-generator",
        lambda g: dict(q=g.rng),
        TypeError,
        "q must be an array of real numbers",
        "got a numpy.random.Generator",
        "q",
    ),
    # mask
    (
        "mask-shape",
        lambda g: dict(mask=np.ones(4, bool)),
        ValueError,
        f"mask must be broadcastable to (..., H, T, S) = {SCORES}",
        "got shape (4,)",
        "mask",
    ),
    (
        "mask-key-padding-(B,S)",
        lambda g: dict(mask=np.ones((B, S), bool)),
        ValueError,
        f"mask must be broadcastable to (..., H, T, S) = {SCORES}",
        f"got shape {(B, S)}",
        "mask",
    ),
    (
        "mask-enlarges-rank",
        lambda g: dict(mask=np.ones((1, *SCORES), bool)),
        ValueError,
        f"mask must be broadcastable to (..., H, T, S) = {SCORES}",
        f"got shape {(1, *SCORES)}",
        "mask",
    ),
    (
        "mask-enlarges-T",
        lambda g: dict(q=g.q[:, :, :1], mask=np.ones((1, 1, 4, S), bool)),
        ValueError,
        f"mask must be broadcastable to (..., H, T, S) = {(B, H, 1, S)}",
        f"got shape {(1, 1, 4, S)}",
        "mask",
    ),
    (
        "mask-int",
        lambda g: dict(mask=g.mask.astype(int)),
        TypeError,
        "mask must be a boolean array",
        "got dtype int64",
        "mask",
    ),
    (
        "mask-float",
        lambda g: dict(mask=g.mask.astype(float)),
        TypeError,
        "mask must be a boolean array",
        "got dtype float64",
        "mask",
    ),
    (
        "mask-complex",
        lambda g: dict(mask=g.mask.astype(complex)),
        TypeError,
        "mask must be a boolean array",
        "got dtype complex128",
        "mask",
    ),
    # bias
    (
        "bias-shape",
        lambda g: dict(bias=np.zeros((T, 4))),
        ValueError,
        f"bias must be broadcastable to (..., H, T, S) = {SCORES}",
        f"got shape {(T, 4)}",
        "bias",
    ),
    (
        "bias-enlarges-rank",
        lambda g: dict(bias=np.zeros((2, *SCORES))),
        ValueError,
        f"bias must be broadcastable to (..., H, T, S) = {SCORES}",
        f"got shape {(2, *SCORES)}",
        "bias",
    ),
    (
        "bias-enlarges-T",
        lambda g: dict(q=g.q[:, :, :1], bias=np.zeros((4, S))),
        ValueError,
        f"bias must be broadcastable to (..., H, T, S) = {(B, H, 1, S)}",
        f"got shape {(4, S)}",
        "bias",
    ),
    (
        "bias-nan",
        lambda g: dict(bias=_with(np.zeros((T, S)), (1, 2), np.nan)),
        ValueError,
        "bias must be finite or -inf",
        "NaN",
        "bias",
    ),
    (
        "bias-posinf",
        lambda g: dict(bias=_with(np.zeros((T, S)), (0, 0), np.inf)),
        ValueError,
        "bias must be finite or -inf",
        "+inf",
        "bias",
    ),
    (
        "bias-complex-with-real-dtype",
        lambda g: dict(bias=np.zeros((T, S), complex), dtype=np.float64),
        TypeError,
        "bias is complex (complex128)",
        "but the compute dtype is float64",
        "bias",
    ),
    (
        "bias-object",
        lambda g: dict(bias=np.zeros((T, S), object)),
        TypeError,
        "bias must hold real numbers",
        "got dtype object",
        "bias",
    ),
    # causal, align, empty_rows
    (
        "causal-str",
        lambda g: dict(causal="yes"),
        TypeError,
        "causal must be a bool",
        "got 'yes'",
        "causal",
    ),
    (
        "align-unknown",
        lambda g: dict(causal=True, align="center"),
        ValueError,
        "align must be one of ('top_left', 'bottom_right')",
        "got 'center'",
        "align",
    ),
    (
        "empty_rows-unknown",
        lambda g: dict(empty_rows="skip"),
        ValueError,
        "empty_rows must be one of ('zero', 'uniform', 'nan', 'raise')",
        "got 'skip'",
        "empty_rows",
    ),
    # window
    (
        "window-left-negative",
        lambda g: dict(window=(-1, 2)),
        ValueError,
        "window[0] (left) must be >= 0",
        "got -1",
        "window",
    ),
    (
        "window-right-negative",
        lambda g: dict(window=(None, -3)),
        ValueError,
        "window[1] (right) must be >= 0",
        "got -3",
        "window",
    ),
    (
        "window-float",
        lambda g: dict(window=(1.5, None)),
        TypeError,
        "window[0] (left) must be a non-negative int or None",
        "got 1.5",
        "window",
    ),
    (
        "window-bool",
        lambda g: dict(window=(1, True)),
        TypeError,
        "window[1] (right) must be a non-negative int or None",
        "got True",
        "window",
    ),
    (
        "window-length-3",
        lambda g: dict(window=(1, 2, 3)),
        ValueError,
        "window must be None or a pair (left, right)",
        "got (1, 2, 3)",
        "window",
    ),
    (
        "window-length-1",
        lambda g: dict(window=(1,)),
        ValueError,
        "window must be None or a pair (left, right)",
        "got (1,)",
        "window",
    ),
    (
        "window-int",
        lambda g: dict(window=2),
        ValueError,
        "window must be None or a pair (left, right)",
        "got 2",
        "window",
    ),
    # scale, softcap
    (
        "scale-negative",
        lambda g: dict(scale=-0.5),
        ValueError,
        "scale must be >= 0",
        "got -0.5",
        "scale",
    ),
    (
        "scale-inf",
        lambda g: dict(scale=np.inf),
        ValueError,
        "scale must be finite",
        "got inf",
        "scale",
    ),
    (
        "scale-nan",
        lambda g: dict(scale=np.nan),
        ValueError,
        "scale must be finite",
        "got nan",
        "scale",
    ),
    (
        "scale-str",
        lambda g: dict(scale="0.5"),
        TypeError,
        "scale must be a real number",
        "got '0.5'",
        "scale",
    ),
    (
        "softcap-zero",
        lambda g: dict(softcap=0),
        ValueError,
        "softcap must be > 0",
        "got 0.0",
        "softcap",
    ),
    (
        "softcap-negative",
        lambda g: dict(softcap=-30.0),
        ValueError,
        "softcap must be > 0",
        "got -30.0",
        "softcap",
    ),
    (
        "softcap-inf",
        lambda g: dict(softcap=np.inf),
        ValueError,
        "softcap must be finite",
        "got inf",
        "softcap",
    ),
    (
        "softcap-nan",
        lambda g: dict(softcap=np.nan),
        ValueError,
        "softcap must be finite",
        "got nan",
        "softcap",
    ),
    # dropout
    (
        "dropout_p-negative",
        lambda g: dict(dropout_p=-0.1, dropout_mask=g.keep),
        ValueError,
        "dropout_p must be >= 0",
        "got -0.1",
        "dropout_p",
    ),
    (
        "dropout_p-one",
        lambda g: dict(dropout_p=1.0, dropout_mask=g.keep),
        ValueError,
        "dropout_p must be in [0, 1)",
        "got 1.0",
        "dropout_p",
    ),
    (
        "dropout_p-above-one",
        lambda g: dict(dropout_p=1.5, dropout_mask=g.keep),
        ValueError,
        "dropout_p must be in [0, 1)",
        "got 1.5",
        "dropout_p",
    ),
    (
        "dropout_p-nan",
        lambda g: dict(dropout_p=np.nan, dropout_mask=g.keep),
        ValueError,
        "dropout_p must be finite",
        "got nan",
        "dropout_p",
    ),
    (
        "dropout_p-str",
        lambda g: dict(dropout_p="0.1", dropout_mask=g.keep),
        TypeError,
        "dropout_p must be a real number",
        "got '0.1'",
        "dropout_p",
    ),
    (
        "dropout_p-without-mask",
        lambda g: dict(dropout_p=0.25),
        ValueError,
        f"dropout_p > 0 needs dropout_mask: a boolean keep-mask of shape (..., H, T, S) = {SCORES}",
        "got None",
        "dropout_mask",
    ),
    (
        "keep-mask-shape-broadcastable",
        lambda g: dict(dropout_p=0.25, dropout_mask=g.keep[0, 0]),
        ValueError,
        f"dropout_mask must have the attention weights' shape (..., H, T, S) = {SCORES}",
        f"got shape {(T, S)}",
        "dropout_mask",
    ),
    (
        "keep-mask-shape",
        lambda g: dict(dropout_p=0.25, dropout_mask=np.ones((B, H, S, T), bool)),
        ValueError,
        f"dropout_mask must have the attention weights' shape (..., H, T, S) = {SCORES}",
        f"got shape {(B, H, S, T)}",
        "dropout_mask",
    ),
    (
        "keep-mask-int",
        lambda g: dict(dropout_p=0.25, dropout_mask=g.keep.astype(int)),
        TypeError,
        "dropout_mask must be a boolean keep-mask",
        "got dtype int64",
        "dropout_mask",
    ),
    (
        "keep-mask-float",
        lambda g: dict(dropout_p=0.25, dropout_mask=g.keep.astype(float)),
        TypeError,
        "dropout_mask must be a boolean keep-mask",
        "got dtype float64",
        "dropout_mask",
    ),
    (
        "keep-mask-ragged-list",
        lambda g: dict(dropout_p=0.25, dropout_mask=[[True], [True, False]]),
        TypeError,
        "dropout_mask could not be converted to a numpy array",
        "inhomogeneous",
        "dropout_mask",
    ),
    (
        "keep-mask-with-dropout_p-0",
        lambda g: dict(dropout_mask=g.keep),
        ValueError,
        "dropout_mask was given but",
        "dropout_p is 0",
        "dropout_mask",
    ),
    # dtype
    (
        "dtype-int32",
        lambda g: dict(dtype=np.int32),
        TypeError,
        "dtype must be a real floating dtype",
        "got int32",
        "dtype",
    ),
    (
        "dtype-complex64",
        lambda g: dict(dtype="complex64"),
        TypeError,
        "dtype must be a real floating dtype",
        "got complex64",
        "dtype",
    ),
    (
        "dtype-unknown",
        lambda g: dict(dtype="float65"),
        TypeError,
        "dtype must be a real floating dtype",
        "got 'float65'",
        "dtype",
    ),
    # empty rows under "raise": the message says which row
    (
        "empty-row-by-mask",
        lambda g: dict(mask=_with(np.ones(SCORES, bool), (1, 2, 1), False), empty_rows="raise"),
        ValueError,
        "empty_rows='raise': 1 query row(s) have no key to attend",
        "index (1, 2, 1) of (..., H, T)",
        "empty_rows",
    ),
    (
        "empty-row-by-neg-inf-bias",
        lambda g: dict(bias=g.bias_neginf, empty_rows="raise"),
        ValueError,
        f"empty_rows='raise': {B * H} query row(s) have no key to attend",
        "index (0, 0, 1)",
        "empty_rows",
    ),
    (
        "empty-row-by-causal-and-mask",
        lambda g: dict(
            causal=True, mask=np.array([False, True, True, True, True]), empty_rows="raise"
        ),
        ValueError,
        f"empty_rows='raise': {B * H} query row(s) have no key to attend",
        "index (0, 0, 0)",
        "empty_rows",
    ),
]

SDPA_ENTRIES = {
    "scaled_dot_product_attention": lambda g, kw: ar.scaled_dot_product_attention(**kw),
    "scaled_dot_product_attention_backward": lambda g, kw: ar.scaled_dot_product_attention_backward(
        g.dout, **kw
    ),
}


def _sdpa_bad(entry, overrides):
    def call(g):
        kw = dict(q=g.q, k=g.k, v=g.v)
        kw.update(overrides(g))
        return SDPA_ENTRIES[entry](g, kw)

    return call


# Multi-head attention: (id, overrides of the valid query/key/value/params/num_heads/options, ...).
MHA_BAD = [
    (
        "query-rank-1",
        lambda g: dict(query=g.query[0, 0]),
        ValueError,
        "query must have shape (..., T, Dq_in)",
        f"got shape {(D,)}",
        "query",
    ),
    (
        "key-rank-1",
        lambda g: dict(key=g.key[0, 0]),
        ValueError,
        "key must have shape (..., S, Dk_in)",
        f"got shape {(KDIM,)}",
        "key",
    ),
    (
        "value-rank-0",
        lambda g: dict(value=g.value[0, 0, 0]),
        ValueError,
        "value must have shape (..., S, Dv_in)",
        "got shape ()",
        "value",
    ),
    (
        "query-width",
        lambda g: dict(query=g.query[..., :7]),
        ValueError,
        f"query's last axis must match params.w_q.shape[0] = {D}",
        f"query.shape={(B, T, 7)}",
        "query",
    ),
    (
        "key-width",
        lambda g: dict(key=g.key[..., :4]),
        ValueError,
        f"key's last axis must match params.w_k.shape[0] = {KDIM}",
        f"key.shape={(B, S, 4)}",
        "key",
    ),
    (
        "value-S",
        lambda g: dict(value=g.value[:, :4]),
        ValueError,
        "key and value must share (..., S)",
        f"value.shape={(B, 4, VDIM)}",
        "value",
    ),
    (
        "query-batch-would-broadcast",
        lambda g: dict(query=g.query[:1]),
        ValueError,
        "query and key must have the same batch dims",
        f"query.shape={(1, T, D)}",
        "query",
    ),
    (
        "query-empty",
        lambda g: dict(query=g.query[:, :0]),
        ValueError,
        "query must not be empty",
        f"got shape {(B, 0, D)}",
        "query",
    ),
    (
        "query-complex-with-real-dtype",
        lambda g: dict(query=g.query * 1j, dtype=np.float32),
        TypeError,
        "query is complex (complex128)",
        "but the compute dtype is float32",
        "query",
    ),
    (
        "key-object",
        lambda g: dict(key=g.key.astype(object)),
        TypeError,
        "key must hold real numbers",
        "got dtype object",
        "key",
    ),
    # params
    (
        "params-dict",
        lambda g: dict(params=dataclasses.asdict(g.params)),
        TypeError,
        "params must be a MultiHeadParams",
        "got dict",
        "params",
    ),
    (
        "params-tuple",
        lambda g: dict(params=tuple(g.params.as_dict().values())),
        TypeError,
        "params must be a MultiHeadParams",
        "got tuple",
        "params",
    ),
    (
        "w_q-not-divisible-by-num_heads",
        lambda g: dict(params=dataclasses.replace(g.params, w_q=np.zeros((D, 10)), b_q=None)),
        ValueError,
        "params.w_q has 10 columns (H*Dk), not divisible by",
        f"num_heads={H}",
        "params.w_q",
    ),
    (
        "w_k-columns",
        lambda g: dict(params=dataclasses.replace(g.params, w_k=np.zeros((KDIM, 8)), b_k=None)),
        ValueError,
        f"params.w_k must have Hkv*Dk = {HKV}*{MDK} = {HKV * MDK} columns",
        f"got shape {(KDIM, 8)}",
        "params.w_k",
    ),
    (
        "w_v-not-divisible-by-num_kv_heads",
        lambda g: dict(params=dataclasses.replace(g.params, w_v=np.zeros((VDIM, 5)), b_v=None)),
        ValueError,
        "params.w_v has 5 columns (Hkv*Dv), not divisible by",
        f"num_kv_heads={HKV}",
        "params.w_v",
    ),
    (
        "w_o-rows",
        lambda g: dict(params=dataclasses.replace(g.params, w_o=np.zeros((9, D)))),
        ValueError,
        f"params.w_o must have H*Dv = {H}*{MDV} = {H * MDV} rows",
        f"got shape {(9, D)}",
        "params.w_o",
    ),
    (
        "w_q-rank-1",
        lambda g: dict(params=dataclasses.replace(g.params, w_q=np.zeros(H * MDK))),
        ValueError,
        "params.w_q must have shape (in, out)",
        f"got shape {(H * MDK,)}",
        "params.w_q",
    ),
    (
        "w_k-None",
        lambda g: dict(params=dataclasses.replace(g.params, w_k=None)),
        TypeError,
        "params.w_k must be an array",
        "got None",
        "params.w_k",
    ),
    (
        "w_o-complex-with-real-dtype",
        lambda g: dict(
            params=dataclasses.replace(g.params, w_o=g.params.w_o + 0j), dtype=np.float64
        ),
        TypeError,
        "params.w_o is complex (complex128)",
        "but the compute dtype is float64",
        "params.w_o",
    ),
    (
        "b_q-shape",
        lambda g: dict(params=dataclasses.replace(g.params, b_q=np.zeros(H * MDK - 1))),
        ValueError,
        f"params.b_q must have shape ({H * MDK},)",
        f"got ({H * MDK - 1},)",
        "params.b_q",
    ),
    (
        "b_v-would-broadcast",
        lambda g: dict(params=dataclasses.replace(g.params, b_v=np.zeros(1))),
        ValueError,
        f"params.b_v must have shape ({HKV * MDV},)",
        "got (1,)",
        "params.b_v",
    ),
    (
        "b_o-rank-2",
        lambda g: dict(params=dataclasses.replace(g.params, b_o=np.zeros((1, D)))),
        ValueError,
        "params.b_o must have shape (out,)",
        f"got shape {(1, D)}",
        "params.b_o",
    ),
    # head counts
    (
        "num_heads-zero",
        lambda g: dict(num_heads=0),
        ValueError,
        "num_heads must be a positive int",
        "got 0",
        "num_heads",
    ),
    (
        "num_heads-negative",
        lambda g: dict(num_heads=-4),
        ValueError,
        "num_heads must be a positive int",
        "got -4",
        "num_heads",
    ),
    (
        "num_heads-float",
        lambda g: dict(num_heads=4.0),
        TypeError,
        "num_heads must be a positive int",
        "got 4.0",
        "num_heads",
    ),
    (
        "num_heads-bool",
        lambda g: dict(num_heads=True),
        TypeError,
        "num_heads must be a positive int",
        "got True",
        "num_heads",
    ),
    (
        "num_heads-None",
        lambda g: dict(num_heads=None),
        TypeError,
        "num_heads must be a positive int",
        "got None",
        "num_heads",
    ),
    (
        "num_kv_heads-zero",
        lambda g: dict(num_kv_heads=0),
        ValueError,
        "num_kv_heads must be a positive int",
        "got 0",
        "num_kv_heads",
    ),
    (
        "H-not-multiple-of-Hkv",
        lambda g: dict(num_heads=3),
        ValueError,
        "num_heads=3 must be a multiple of",
        f"num_kv_heads={HKV}",
        "num_heads",
    ),
    (
        "Hkv-not-divisor",
        lambda g: dict(num_kv_heads=3),
        ValueError,
        f"num_heads={H} must be a multiple of",
        "num_kv_heads=3",
        "num_kv_heads",
    ),
    # attention options pass through and are checked at head level
    (
        "mask-key-padding-(B,S)",
        lambda g: dict(mask=np.ones((B, S), bool)),
        ValueError,
        f"mask must be broadcastable to (..., H, T, S) = {SCORES}",
        f"got shape {(B, S)}",
        "mask",
    ),
    (
        "mask-int",
        lambda g: dict(mask=np.ones((T, S), int)),
        TypeError,
        "mask must be a boolean array",
        "got dtype int64",
        "mask",
    ),
    (
        "bias-nan",
        lambda g: dict(bias=_with(np.zeros((T, S)), (0, 1), np.nan)),
        ValueError,
        "bias must be finite or -inf",
        "NaN",
        "bias",
    ),
    (
        "bias-enlarges-rank",
        lambda g: dict(bias=np.zeros((1, *SCORES))),
        ValueError,
        f"bias must be broadcastable to (..., H, T, S) = {SCORES}",
        f"got shape {(1, *SCORES)}",
        "bias",
    ),
    (
        "keep-mask-module-shape",
        lambda g: dict(dropout_p=0.25, dropout_mask=np.ones((B, T, S), bool)),
        ValueError,
        f"dropout_mask must have the attention weights' shape (..., H, T, S) = {SCORES}",
        f"got shape {(B, T, S)}",
        "dropout_mask",
    ),
    (
        "dropout_p-one",
        lambda g: dict(dropout_p=1.0, dropout_mask=g.keep),
        ValueError,
        "dropout_p must be in [0, 1)",
        "got 1.0",
        "dropout_p",
    ),
    (
        "window-negative",
        lambda g: dict(window=(0, -1)),
        ValueError,
        "window[1] (right) must be >= 0",
        "got -1",
        "window",
    ),
    (
        "softcap-zero",
        lambda g: dict(softcap=0.0),
        ValueError,
        "softcap must be > 0",
        "got 0.0",
        "softcap",
    ),
    (
        "align-unknown",
        lambda g: dict(align="bottom-right"),
        ValueError,
        "align must be one of",
        "got 'bottom-right'",
        "align",
    ),
    (
        "empty-row-raise",
        lambda g: dict(
            mask=np.array([True, True, True, False, False]),
            causal=True,
            align="bottom_right",
            window=(0, 0),
            empty_rows="raise",
        ),
        ValueError,
        f"empty_rows='raise': {2 * B * H} query row(s) have no key to attend",
        "index (0, 0, 1)",
        "empty_rows",
    ),
    (
        "dtype-complex64",
        lambda g: dict(dtype=np.complex64),
        TypeError,
        "dtype must be a real floating dtype",
        "got complex64",
        "dtype",
    ),
]

MHA_ENTRIES = {
    "multi_head_attention": lambda g, kw: ar.multi_head_attention(**kw),
    "multi_head_attention_backward": lambda g, kw: ar.multi_head_attention_backward(g.mdout, **kw),
}


def _mha_bad(entry, overrides):
    def call(g):
        kw = dict(
            query=g.query, key=g.key, value=g.value, params=g.params, num_heads=H, num_kv_heads=HKV
        )
        kw.update(overrides(g))
        return MHA_ENTRIES[entry](g, kw)

    return call


# Other entry points: (id, call, exception, says, actual, argument).
OTHER_BAD = [
    # backward-only arguments
    (
        "scaled_dot_product_attention_backward-dout-shape",
        lambda g: ar.scaled_dot_product_attention_backward(g.dout[..., :DK], g.q, g.k, g.v),
        ValueError,
        f"dout must have the output's shape (..., H, T, Dv) = {OUT}",
        f"got {(B, H, T, DK)}",
        "dout",
    ),
    (
        "scaled_dot_product_attention_backward-dout-would-broadcast",
        lambda g: ar.scaled_dot_product_attention_backward(g.dout[:1], g.q, g.k, g.v),
        ValueError,
        f"dout must have the output's shape (..., H, T, Dv) = {OUT}",
        f"got {(1, H, T, DV)}",
        "dout",
    ),
    (
        "scaled_dot_product_attention_backward-dout-complex",
        lambda g: ar.scaled_dot_product_attention_backward(g.dout * 1j, g.q, g.k, g.v),
        TypeError,
        "dout is complex (complex128)",
        "but the compute dtype is float64",
        "dout",
    ),
    (
        "scaled_dot_product_attention_backward-generator-keep-mask",
        lambda g: ar.scaled_dot_product_attention_backward(
            g.dout, g.q, g.k, g.v, dropout_p=0.25, dropout_mask=g.rng
        ),
        ValueError,
        "dropout_mask must be the boolean keep-mask the forward used",
        "not a Generator",
        "dropout_mask",
    ),
    (
        "sdpa_backward-dout-shape",
        lambda g: ar.sdpa_backward(g.dout[..., :1, :], ar.sdpa_forward(g.q, g.k, g.v)),
        ValueError,
        f"dout must have the output's shape (..., H, T, Dv) = {OUT}",
        f"got {(B, H, 1, DV)}",
        "dout",
    ),
    (
        "sdpa_backward-trace-type",
        lambda g: ar.sdpa_backward(g.dout, {"out": g.dout}),
        TypeError,
        "trace must be the AttentionTrace returned by sdpa_forward",
        "got dict",
        "trace",
    ),
    (
        "sdpa_forward-q-rank",
        lambda g: ar.sdpa_forward(g.q[0, 0], g.k, g.v),
        ValueError,
        "q must have shape (..., H, T, Dk)",
        f"got shape {(T, DK)}",
        "q",
    ),
    (
        "dropout_keep_mask-p",
        lambda g: ar.dropout_keep_mask(SCORES, 1.0, g.rng),
        ValueError,
        "dropout_p must be in [0, 1)",
        "got 1.0",
        "dropout_p",
    ),
    (
        "dropout_keep_mask-shape-negative",
        lambda g: ar.dropout_keep_mask((B, -1), 0.25, g.rng),
        ValueError,
        "shape",
        f"{(B, -1)}",
        "shape",
    ),
    (
        "dropout_keep_mask-rng",
        lambda g: ar.dropout_keep_mask(SCORES, 0.25, 0),
        TypeError,
        "rng must be a numpy.random.Generator",
        "got int",
        "rng",
    ),
    (
        "multi_head_attention_backward-dout-shape",
        lambda g: ar.multi_head_attention_backward(
            g.mdout[..., :7], g.query, g.key, g.value, g.params, num_heads=H, num_kv_heads=HKV
        ),
        ValueError,
        f"dout must have the output's shape (..., T, D_out) = {(B, T, D)}",
        f"got {(B, T, 7)}",
        "dout",
    ),
    (
        "multi_head_attention_backward-generator-keep-mask",
        lambda g: ar.multi_head_attention_backward(
            g.mdout,
            g.query,
            g.key,
            g.value,
            g.params,
            num_heads=H,
            num_kv_heads=HKV,
            dropout_p=0.25,
            dropout_mask=g.rng,
        ),
        ValueError,
        "dropout_mask must be the boolean keep-mask the forward used",
        "not a Generator",
        "dropout_mask",
    ),
    (
        "mha_backward-dout-would-broadcast",
        lambda g: ar.mha_backward(
            g.mdout[:1],
            ar.mha_forward(g.query, g.key, g.value, g.params, num_heads=H, num_kv_heads=HKV),
        ),
        ValueError,
        f"dout must have the output's shape (..., T, D_out) = {(B, T, D)}",
        f"got {(1, T, D)}",
        "dout",
    ),
    (
        "mha_backward-trace-type",
        lambda g: ar.mha_backward(g.mdout, ar.sdpa_forward(g.q, g.k, g.v)),
        TypeError,
        "trace must be the MultiHeadTrace returned by mha_forward",
        "got AttentionTrace",
        "trace",
    ),
    (
        "mha_forward-unknown-option",
        lambda g: ar.mha_forward(
            g.query, g.key, g.value, g.params, num_heads=H, num_kv_heads=HKV, is_causal=True
        ),
        TypeError,
        "unknown attention option(s)",
        "['is_causal']",
        "is_causal",
    ),
    (
        "mha_forward-params-type",
        lambda g: ar.mha_forward(
            g.query, g.key, g.value, g.params.as_dict(), num_heads=H, num_kv_heads=HKV
        ),
        TypeError,
        "params must be a MultiHeadParams",
        "got dict",
        "params",
    ),
    # init_params
    (
        "init_params-d_model-not-divisible",
        lambda g: ar.init_params(g.rng, d_model=10, num_heads=4),
        ValueError,
        "d_model=10 must be divisible by",
        "num_heads=4",
        "d_model",
    ),
    (
        "init_params-bias-not-bool",
        lambda g: ar.init_params(g.rng, d_model=8, num_heads=2, bias="no"),
        TypeError,
        "bias must be a bool",
        "got 'no'",
        "bias",
    ),
    (
        "init_params-num_heads-zero",
        lambda g: ar.init_params(g.rng, d_model=8, num_heads=0),
        ValueError,
        "num_heads must be a positive int",
        "got 0",
        "num_heads",
    ),
    (
        "init_params-num_heads-negative",
        lambda g: ar.init_params(g.rng, d_model=8, num_heads=-2),
        ValueError,
        "num_heads must be a positive int",
        "got -2",
        "num_heads",
    ),
    (
        "init_params-num_heads-float",
        lambda g: ar.init_params(g.rng, d_model=8, num_heads=2.0),
        TypeError,
        "num_heads must be a positive int",
        "got 2.0",
        "num_heads",
    ),
    (
        "init_params-num_heads-str",
        lambda g: ar.init_params(g.rng, d_model=8, num_heads="2"),
        TypeError,
        "num_heads must be a positive int",
        "got '2'",
        "num_heads",
    ),
    (
        "init_params-d_model-negative",
        lambda g: ar.init_params(g.rng, d_model=-8, num_heads=2),
        ValueError,
        "d_model must be a positive int",
        "got -8",
        "d_model",
    ),
    (
        "init_params-num_kv_heads-not-divisor",
        lambda g: ar.init_params(g.rng, d_model=8, num_heads=4, num_kv_heads=3),
        ValueError,
        "num_heads=4 must be a multiple of",
        "num_kv_heads=3",
        "num_kv_heads",
    ),
    (
        "init_params-head_dim-zero",
        lambda g: ar.init_params(g.rng, d_model=8, num_heads=2, head_dim=0),
        ValueError,
        "head_dim must be a positive int",
        "got 0",
        "head_dim",
    ),
    (
        "init_params-kdim-float",
        lambda g: ar.init_params(g.rng, d_model=8, num_heads=2, kdim=6.0),
        TypeError,
        "kdim must be a positive int",
        "got 6.0",
        "kdim",
    ),
    (
        "init_params-rng-RandomState",
        lambda g: ar.init_params(np.random.RandomState(0), d_model=8, num_heads=2),
        TypeError,
        "rng must be a numpy.random.Generator",
        "got RandomState",
        "rng",
    ),
    # linear
    (
        "linear-x-scalar",
        lambda g: ar.linear(3.0, g.w),
        ValueError,
        "x must have shape (..., in)",
        "got shape ()",
        "x",
    ),
    (
        "linear-weight-rank-1",
        lambda g: ar.linear(g.x, g.w[:, 0]),
        ValueError,
        "weight must have shape (in, out)",
        f"got shape {(D,)}",
        "weight",
    ),
    (
        "linear-weight-rank-3",
        lambda g: ar.linear(g.x, g.w[None]),
        ValueError,
        "weight must have shape (in, out)",
        f"got shape {(1, D, DOUT)}",
        "weight",
    ),
    (
        "linear-x-width",
        lambda g: ar.linear(g.x[..., :7], g.w),
        ValueError,
        f"x must have in={D} features like weight",
        f"got x.shape={(B, T, 7)}",
        "x",
    ),
    (
        "linear-bias-shape",
        lambda g: ar.linear(g.x, g.w, g.b[:4]),
        ValueError,
        f"bias must have shape (out,) = ({DOUT},)",
        "got shape (4,)",
        "bias",
    ),
    (
        "linear-bias-would-broadcast",
        lambda g: ar.linear(g.x, g.w, g.b[None]),
        ValueError,
        f"bias must have shape (out,) = ({DOUT},)",
        f"got shape {(1, DOUT)}",
        "bias",
    ),
    (
        "linear-x-complex-with-real-dtype",
        lambda g: ar.linear(g.x + 0j, g.w, dtype=np.float64),
        TypeError,
        "x is complex (complex128)",
        "but the compute dtype is float64",
        "x",
    ),
    (
        "linear-weight-object",
        lambda g: ar.linear(g.x, g.w.astype(object)),
        TypeError,
        "weight must hold real numbers",
        "got dtype object",
        "weight",
    ),
    (
        "linear-bias-complex-with-real-dtype",
        lambda g: ar.linear(g.x, g.w, g.b + 0j, dtype=np.float32),
        TypeError,
        "bias is complex (complex128)",
        "but the compute dtype is float32",
        "bias",
    ),
    (
        "linear_backward-dy-would-broadcast",
        lambda g: ar.linear_backward(g.dy[:1], g.x, g.w, g.b),
        ValueError,
        f"dy must have the output's shape (..., out) = {(B, T, DOUT)}",
        f"got {(1, T, DOUT)}",
        "dy",
    ),
    (
        "linear_backward-dy-complex",
        lambda g: ar.linear_backward(g.dy * 1j, g.x, g.w, g.b),
        TypeError,
        "dy is complex (complex128)",
        "but the compute dtype is float64",
        "dy",
    ),
    (
        "linear_backward-x-width",
        lambda g: ar.linear_backward(g.dy, g.x[..., :7], g.w, g.b),
        ValueError,
        f"x must have in={D} features like weight",
        f"got x.shape={(B, T, 7)}",
        "x",
    ),
    # heads
    (
        "split_heads-x-rank-1",
        lambda g: ar.split_heads(g.x[0, 0], 2),
        ValueError,
        "x must have shape (..., T, H*Dh)",
        f"got shape {(D,)}",
        "x",
    ),
    (
        "split_heads-not-divisible",
        lambda g: ar.split_heads(g.x, 3),
        ValueError,
        f"x's last axis (H*Dh = {D}) must be divisible by num_heads=3",
        f"got x.shape={(B, T, D)}",
        "num_heads",
    ),
    (
        "split_heads-num_heads-zero",
        lambda g: ar.split_heads(g.x, 0),
        ValueError,
        "num_heads must be a positive int",
        "got 0",
        "num_heads",
    ),
    (
        "split_heads-num_heads-float",
        lambda g: ar.split_heads(g.x, 2.0),
        TypeError,
        "num_heads must be a positive int",
        "got 2.0",
        "num_heads",
    ),
    (
        "split_heads-x-complex-with-real-dtype",
        lambda g: ar.split_heads(g.x + 0j, 2, dtype=np.float64),
        TypeError,
        "x is complex (complex128)",
        "but the compute dtype is float64",
        "x",
    ),
    (
        "split_heads-dtype",
        lambda g: ar.split_heads(g.x, 2, dtype=np.int32),
        TypeError,
        "dtype must be a real floating dtype",
        "got int32",
        "dtype",
    ),
    (
        "merge_heads-x-rank-2",
        lambda g: ar.merge_heads(g.x[0]),
        ValueError,
        "x must have shape (..., H, T, Dh)",
        f"got shape {(T, D)}",
        "x",
    ),
    (
        "merge_heads-x-object",
        lambda g: ar.merge_heads(g.heads.astype(object)),
        TypeError,
        "x must hold real numbers",
        "got dtype object",
        "x",
    ),
    (
        "split_heads_backward-rank-2",
        lambda g: ar.split_heads_backward(g.x[0]),
        ValueError,
        "x must have shape (..., H, T, Dh)",
        f"got shape {(T, D)}",
        "x",
    ),
    (
        "merge_heads_backward-not-divisible",
        lambda g: ar.merge_heads_backward(g.x, 3),
        ValueError,
        f"x's last axis (H*Dh = {D}) must be divisible by num_heads=3",
        f"got x.shape={(B, T, D)}",
        "num_heads",
    ),
    # softmax, logsumexp
    (
        "softmax-scalar",
        lambda g: ar.softmax(1.0),
        ValueError,
        "x must have at least 1 dim",
        "got a scalar",
        "x",
    ),
    (
        "softmax-axis-out-of-range",
        lambda g: ar.softmax(g.logits, axis=3),
        ValueError,
        "axis must be in [-3, 3) for an input of 3 dims",
        "got 3",
        "axis",
    ),
    (
        "softmax-axis-float",
        lambda g: ar.softmax(g.logits, axis=1.0),
        TypeError,
        "axis must be an int",
        "got 1.0",
        "axis",
    ),
    (
        "softmax-complex-with-real-dtype",
        lambda g: ar.softmax(g.logits + 0j, dtype=np.float64),
        TypeError,
        "x is complex (complex128)",
        "but the compute dtype is float64",
        "x",
    ),
    (
        "softmax-object",
        lambda g: ar.softmax(g.logits.astype(object)),
        TypeError,
        "x must hold real numbers",
        "got dtype object",
        "x",
    ),
    (
        "softmax-dtype",
        lambda g: ar.softmax(g.logits, dtype="complex64"),
        TypeError,
        "dtype must be a real floating dtype",
        "got complex64",
        "dtype",
    ),
    (
        "softmax_backward-dprobs-would-broadcast",
        lambda g: ar.softmax_backward(g.dprobs[:1], g.probs),
        ValueError,
        f"dprobs must have probs' shape {(B, T, S)}",
        f"got {(1, T, S)}",
        "dprobs",
    ),
    (
        "softmax_backward-probs-complex-with-real-dtype",
        lambda g: ar.softmax_backward(g.dprobs, g.probs + 0j, dtype=np.float64),
        TypeError,
        "probs is complex (complex128)",
        "but the compute dtype is float64",
        "probs",
    ),
    (
        "logsumexp-axis-out-of-range",
        lambda g: ar.logsumexp(g.logits, axis=-4),
        ValueError,
        "axis must be in [-3, 3)",
        "got -4",
        "axis",
    ),
    (
        "logsumexp-complex-with-real-dtype",
        lambda g: ar.logsumexp(g.logits * 1j, dtype=np.float32),
        TypeError,
        "x is complex (complex128)",
        "but the compute dtype is float32",
        "x",
    ),
    (
        "logsumexp_backward-dlse-shape",
        lambda g: ar.logsumexp_backward(g.dlse[..., None], g.logits),
        ValueError,
        f"dlse must have logsumexp's output shape {(B, T)}",
        f"got {(B, T, 1)}",
        "dlse",
    ),
    (
        "logsumexp_backward-keepdims-shape",
        lambda g: ar.logsumexp_backward(g.dlse, g.logits, keepdims=True),
        ValueError,
        f"dlse must have logsumexp's output shape {(B, T, 1)}",
        f"got {(B, T)}",
        "dlse",
    ),
    # mask builders
    (
        "causal_mask-T-zero",
        lambda g: ar.causal_mask(0, S),
        ValueError,
        "T must be a positive int",
        "got 0",
        "T",
    ),
    (
        "causal_mask-align",
        lambda g: ar.causal_mask(T, S, align="lower_right"),
        ValueError,
        "align must be one of",
        "got 'lower_right'",
        "align",
    ),
    (
        "window_mask-negative",
        lambda g: ar.window_mask(T, S, (-2, 0)),
        ValueError,
        "window[0] (left) must be >= 0",
        "got -2",
        "window",
    ),
    (
        "attention_mask-shape",
        lambda g: ar.attention_mask(T, S, mask=np.ones((T, 4), bool)),
        ValueError,
        "mask must be broadcastable to (..., T, S)",
        f"got shape {(T, 4)}",
        "mask",
    ),
    (
        "attention_mask-int",
        lambda g: ar.attention_mask(T, S, mask=np.ones((T, S), int)),
        TypeError,
        "mask must be a boolean array",
        "got dtype int64",
        "mask",
    ),
]


def _bad_params():
    params = []
    for entry in SDPA_ENTRIES:
        for id_, overrides, exc, says, actual, name in SDPA_BAD:
            params.append(
                pytest.param(
                    Bad(_sdpa_bad(entry, overrides), exc, _msg(says, actual), name),
                    id=f"{entry}-{id_}",
                )
            )
    for entry in MHA_ENTRIES:
        for id_, overrides, exc, says, actual, name in MHA_BAD:
            params.append(
                pytest.param(
                    Bad(_mha_bad(entry, overrides), exc, _msg(says, actual), name),
                    id=f"{entry}-{id_}",
                )
            )
    for id_, call, exc, says, actual, name in OTHER_BAD:
        params.append(pytest.param(Bad(call, exc, _msg(says, actual), name), id=id_))
    return params


@pytest.mark.parametrize("bad", _bad_params())
def test_bad_input_gets_a_clear_error_naming_the_argument(bad, g):
    _assert_clear_error(bad, g)


# ----------------------------------------------------------------------------- entry points


def sdpa_round_trip(dout, q, k, v, **options):
    """The trace path end to end: :func:`sdpa_forward` then :func:`sdpa_backward`."""
    return ar.sdpa_backward(dout, ar.sdpa_forward(q, k, v, **options))


def mha_round_trip(dout, query, key, value, params, **options):
    """The trace path end to end: :func:`mha_forward` then :func:`mha_backward`."""
    return ar.mha_backward(dout, ar.mha_forward(query, key, value, params, **options))


# Options of scaled dot-product attention, each exercising another path of the forward/backward.
SDPA_OPTIONS = {
    "plain": lambda g: {},
    "mask-bias": lambda g: dict(mask=g.mask_ts, bias=g.bias),
    "full-mask-full-bias": lambda g: dict(mask=g.mask, bias=g.bias_full),
    "dropout-keep-mask": lambda g: dict(dropout_p=0.25, dropout_mask=g.keep, bias=g.bias_full),
    "causal-window-softcap": lambda g: dict(
        causal=True, align="bottom_right", window=(2, 0), softcap=3.0, scale=0.4
    ),
    "neg-inf-bias-uniform": lambda g: dict(bias=g.bias_neginf, empty_rows="uniform"),
}
MHA_OPTIONS = {
    "plain": lambda g: {},
    "mask-bias-dropout": lambda g: dict(
        mask=g.mask_ts, bias=g.bias_full, dropout_p=0.25, dropout_mask=g.keep
    ),
    "causal-softcap": lambda g: dict(causal=True, align="bottom_right", softcap=3.0),
}


class Case(NamedTuple):
    fn: Callable  #: a public function (or a forward + backward round trip)
    inputs: Callable[[SimpleNamespace], tuple[tuple, dict]]  #: g -> (args, kwargs); accepts dtype=


# Every public forward and backward that takes dtype=: purity, precision and dtype= are tested on
# each.
CASES: dict[str, Case] = {
    "linear": Case(ar.linear, lambda g: ((g.x, g.w, g.b), {})),
    "linear-1d-no-bias": Case(ar.linear, lambda g: ((g.x[0, 0], g.w), {})),
    "linear_backward": Case(ar.linear_backward, lambda g: ((g.dy, g.x, g.w, g.b), {})),
    "split_heads": Case(ar.split_heads, lambda g: ((g.x, H), {})),
    "split_heads-H1": Case(ar.split_heads, lambda g: ((g.x, 1), {})),
    "merge_heads": Case(ar.merge_heads, lambda g: ((g.heads,), {})),
    "merge_heads-H1": Case(ar.merge_heads, lambda g: ((g.heads[:, :1],), {})),
    "split_heads_backward-H1": Case(ar.split_heads_backward, lambda g: ((g.heads[:, :1],), {})),
    "merge_heads_backward-H1": Case(ar.merge_heads_backward, lambda g: ((g.x, 1), {})),
    "softmax": Case(ar.softmax, lambda g: ((g.logits,), {})),
    "softmax-axis0": Case(ar.softmax, lambda g: ((g.logits,), dict(axis=0))),
    "softmax_backward": Case(ar.softmax_backward, lambda g: ((g.dprobs, g.probs), {})),
    "logsumexp": Case(ar.logsumexp, lambda g: ((g.logits,), {})),
    "logsumexp-keepdims": Case(ar.logsumexp, lambda g: ((g.logits,), dict(keepdims=True))),
    "logsumexp_backward": Case(ar.logsumexp_backward, lambda g: ((g.dlse, g.logits), {})),
}
for _name, _opts in SDPA_OPTIONS.items():
    CASES[f"scaled_dot_product_attention-{_name}"] = Case(
        ar.scaled_dot_product_attention, lambda g, o=_opts: ((g.q, g.k, g.v), o(g))
    )
    CASES[f"scaled_dot_product_attention_backward-{_name}"] = Case(
        ar.scaled_dot_product_attention_backward, lambda g, o=_opts: ((g.dout, g.q, g.k, g.v), o(g))
    )
    CASES[f"sdpa_forward-{_name}"] = Case(
        ar.sdpa_forward, lambda g, o=_opts: ((g.q, g.k, g.v), o(g))
    )
    CASES[f"sdpa_forward+sdpa_backward-{_name}"] = Case(
        sdpa_round_trip, lambda g, o=_opts: ((g.dout, g.q, g.k, g.v), o(g))
    )
# Self-attention: the same array passed three times (Dk = Dv, T = S unavoidably).
CASES["scaled_dot_product_attention-self"] = Case(
    ar.scaled_dot_product_attention, lambda g: ((g.xs, g.xs, g.xs), {})
)
CASES["scaled_dot_product_attention_backward-self-causal"] = Case(
    ar.scaled_dot_product_attention_backward,
    lambda g: ((g.dxs, g.xs, g.xs, g.xs), dict(causal=True)),
)
CASES["sdpa_forward-self"] = Case(ar.sdpa_forward, lambda g: ((g.xs, g.xs, g.xs), {}))
CASES["sdpa_forward+sdpa_backward-self"] = Case(
    sdpa_round_trip, lambda g: ((g.dxs, g.xs, g.xs, g.xs), {})
)
_MHA_FUNCTIONS = {
    "multi_head_attention": (ar.multi_head_attention, False),
    "multi_head_attention_backward": (ar.multi_head_attention_backward, True),
    "mha_forward": (ar.mha_forward, False),
    "mha_forward+mha_backward": (mha_round_trip, True),
}
for _fname, (_fn, _takes_dout) in _MHA_FUNCTIONS.items():
    _dout = (lambda g: (g.mdout,)) if _takes_dout else (lambda g: ())
    for _name, _opts in MHA_OPTIONS.items():
        CASES[f"{_fname}-{_name}"] = Case(
            _fn,
            lambda g, o=_opts, d=_dout: (
                (*d(g), g.query, g.key, g.value, g.params),
                dict(num_heads=H, num_kv_heads=HKV, **o(g)),
            ),
        )
    CASES[f"{_fname}-self"] = Case(
        _fn,
        lambda g, d=_dout: (
            (*d(g), g.x, g.x, g.x, g.params_self),
            dict(num_heads=H, num_kv_heads=HKV, causal=True),
        ),
    )
    CASES[f"{_fname}-self-one-head"] = Case(
        _fn, lambda g, d=_dout: ((*d(g), g.x, g.x, g.x, g.params_one_head), dict(num_heads=1))
    )

# Purity only: functions without dtype=, backwards taking a trace, float32 computed in float32
# (no conversion copy that could hide an alias).
PURITY_ONLY: dict[str, Case] = {
    "attention_mask-mask-only": Case(ar.attention_mask, lambda g: ((T, S), dict(mask=g.mask_ts))),
    "attention_mask-mask-causal": Case(
        ar.attention_mask, lambda g: ((T, S), dict(mask=g.mask_ts, causal=True))
    ),
    "linear-float32": Case(
        ar.linear,
        lambda g: (
            _convert((g.x, g.w, g.b), lambda a: a.astype(np.float32)),
            dict(dtype=np.float32),
        ),
    ),
    "split_heads-H1-float32": Case(
        ar.split_heads, lambda g: ((g.x.astype(np.float32), 1), dict(dtype=np.float32))
    ),
    "merge_heads-H1-float32": Case(
        ar.merge_heads, lambda g: ((g.heads[:, :1].astype(np.float32),), dict(dtype=np.float32))
    ),
    "sdpa_forward-float32-dropout": Case(
        ar.sdpa_forward,
        lambda g: (
            _convert((g.q, g.k, g.v), lambda a: a.astype(np.float32)),
            dict(
                mask=g.mask,
                bias=g.bias_full.astype(np.float32),
                dropout_p=0.25,
                dropout_mask=g.keep,
                dtype=np.float32,
            ),
        ),
    ),
    "mha_forward-float32-self": Case(
        ar.mha_forward,
        lambda g: (
            (
                x32 := g.x.astype(np.float32),
                x32,
                x32,
                _convert(g.params_self, lambda a: a.astype(np.float32)),
            ),
            dict(num_heads=H, num_kv_heads=HKV, dtype=np.float32),
        ),
    ),
}
for _name, _opts in {**SDPA_OPTIONS, "self": None}.items():
    if _opts is None:
        PURITY_ONLY["sdpa_backward-self"] = Case(
            ar.sdpa_backward,
            lambda g: ((g.dxs, ar.sdpa_forward(g.xs, g.xs, g.xs, causal=True)), {}),
        )
    else:
        PURITY_ONLY[f"sdpa_backward-{_name}"] = Case(
            ar.sdpa_backward,
            lambda g, o=_opts: ((g.dout, ar.sdpa_forward(g.q, g.k, g.v, **o(g))), {}),
        )
for _name, _opts in MHA_OPTIONS.items():
    PURITY_ONLY[f"mha_backward-{_name}"] = Case(
        ar.mha_backward,
        lambda g, o=_opts: (
            (
                g.mdout,
                ar.mha_forward(
                    g.query, g.key, g.value, g.params, num_heads=H, num_kv_heads=HKV, **o(g)
                ),
            ),
            {},
        ),
    )
PURITY_ONLY["mha_backward-self-one-head"] = Case(
    ar.mha_backward,
    lambda g: ((g.mdout, ar.mha_forward(g.x, g.x, g.x, g.params_one_head, num_heads=1)), {}),
)


# ----------------------------------------------------------------------------- purity


@pytest.mark.parametrize("name", [*CASES, *PURITY_ONLY])
def test_read_only_inputs_are_not_modified_and_outputs_do_not_alias_them(name, g):
    case = {**CASES, **PURITY_ONLY}[name]
    args, kwargs = case.inputs(g)
    inputs = list(_arrays((args, kwargs)))
    assert inputs
    for a in inputs:
        a.setflags(write=False)
    before = [a.copy() for a in inputs]

    result = case.fn(*args, **kwargs)

    for a, was in zip(inputs, before, strict=True):
        np.testing.assert_array_equal(a, was, err_msg=f"{name} modified an input")
    outputs = list(_arrays(result))
    assert outputs
    aliases = [
        (i, j)
        for i, out in enumerate(outputs)
        for j, a in enumerate(inputs)
        if np.shares_memory(out, a)
    ]
    assert not aliases, (
        f"{name}: output arrays share memory with inputs (output #, input #): {aliases}"
    )


# ----------------------------------------------------------------------------- precision

# (to the input, to the float64 reference of the same values, the dtype kinds converted): float
# arrays, and for nested lists the boolean masks and keep-masks too.
CONVERSIONS = {
    "int64": (lambda a: np.round(4 * a).astype(np.int64), lambda a: np.round(4 * a), "f"),
    "int32": (lambda a: np.round(4 * a).astype(np.int32), lambda a: np.round(4 * a), "f"),
    "float16": (
        lambda a: a.astype(np.float16),
        lambda a: a.astype(np.float16).astype(np.float64),
        "f",
    ),
    "float32": (
        lambda a: a.astype(np.float32),
        lambda a: a.astype(np.float32).astype(np.float64),
        "f",
    ),
    "nested-list": (lambda a: a.tolist(), lambda a: a, "fb"),
}
# -inf cannot be an int; the -inf bias case is covered by float16/float32/list through the others.
PRECISION_CASES = [name for name in CASES if "neg-inf" not in name]


@pytest.mark.parametrize("conversion", CONVERSIONS)
@pytest.mark.parametrize("name", PRECISION_CASES)
def test_any_real_input_is_computed_in_float64(name, conversion, g):
    case = CASES[name]
    to_input, to_reference, kinds = CONVERSIONS[conversion]
    inputs = case.inputs(g)
    args, kwargs = _convert(inputs, to_input, kinds)
    ref_args, ref_kwargs = _convert(inputs, to_reference, kinds)

    got = list(_arrays(case.fn(*args, **kwargs)))
    want = list(_arrays(case.fn(*ref_args, **ref_kwargs)))

    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert b.dtype in (np.float64, np.bool_)
        assert a.dtype == b.dtype, (
            f"{name}: {conversion} input gave a {a.dtype} output, not {b.dtype}"
        )
        np.testing.assert_allclose(a, b, rtol=SAME_VALUES_RTOL, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_dtype_float32_computes_in_float32(name, g):
    case = CASES[name]
    args, kwargs = case.inputs(g)
    floats = [a for a in _arrays(case.fn(*args, **kwargs, dtype=np.float32)) if a.dtype.kind != "b"]
    assert floats
    assert all(a.dtype == np.float32 for a in floats), f"{name}: {[str(a.dtype) for a in floats]}"


_ONE_CASE_PER_FUNCTION = list({case.fn: name for name, case in reversed(CASES.items())}.values())


@pytest.mark.parametrize("dtype", [np.int32, "complex64", bool, object])
@pytest.mark.parametrize("name", _ONE_CASE_PER_FUNCTION)
def test_non_floating_dtype_is_a_type_error(name, dtype, g):
    case = CASES[name]
    args, kwargs = case.inputs(g)
    shown = np.dtype(dtype)
    _assert_clear_error(
        Bad(
            lambda g: case.fn(*args, **kwargs, dtype=dtype),
            TypeError,
            _msg("dtype must be a real floating dtype such as numpy.float64", f"got {shown}"),
            "dtype",
        ),
        g,
    )
