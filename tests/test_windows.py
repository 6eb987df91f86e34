"""attention_ref.adapters.windows: each framework's window spelling against the framework itself.

* (a) Where the framework is installed, against its own result: ``jax.nn.dot_product_attention``
  with ``local_window_size`` (outputs, and the attention pattern read off one-hot values), and
  FlexAttention's ``create_mask`` of the tutorial's sliding-window ``mask_mod`` plus
  ``flex_attention``'s output (torch, CPU, eager).
* (b) Otherwise against the framework's documented rule, transcribed here from its source as a
  double loop over (i, j) -- never through attention_ref's own mask builder: FlashAttention's
  docstring and its CUDA kernels' window normalisation; xformers' ``materialize`` (also run with
  torch's ``tril``/``triu`` when torch is installed, and its docstring's printed examples);
  Hugging Face's mask functions and ``sdpa_mask`` examples; gpt-oss's two references; Llama 4's
  (Hugging Face's and Meta's); StreamingLLM's KV-cache eviction, simulated token by token.
* Shapes with T < S, T > S and T = S (and decode, T = 1), several windows including 0 and windows
  longer than the sequence.
* Every converter's output runs through ``scaled_dot_product_attention`` (B = 2, H = 4, Hkv = 2)
  and equals attention under the framework's rule given as an explicit mask.
* The checks can fail: off-by-one conversions (the other window reading, the other alignment)
  are fed to the same comparisons and must disagree.
* Bad inputs raise errors naming the argument, what was expected and what was given.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import require_jax, require_torch

from attention_ref import scaled_dot_product_attention
from attention_ref.adapters.jax import bhtd_from_bthd, bthd_from_bhtd
from attention_ref.adapters.windows import (
    XFORMERS_LOCAL_BIASES,
    window_from_chunked,
    window_from_flash_attn,
    window_from_flex_sliding_window,
    window_from_jax,
    window_from_sliding_window,
    window_from_streaming_llm,
    window_from_xformers,
)
from attention_ref.core.masks import AllowedPairs

#: (T, S): fewer queries than keys (a KV cache), more queries than keys, equal, decode, one key.
SHAPES = [(3, 7), (7, 3), (5, 5), (1, 6), (6, 1)]
KEYS = ("causal", "align", "window", "chunk_size", "sink_tokens")


def dense(T: int, S: int, opts: dict) -> np.ndarray:
    """attention_ref's (T, S) allowed pairs for converted options."""
    allowed = AllowedPairs.build(T, S, **opts).dense()
    return np.ones((T, S), dtype=bool) if allowed is None else np.broadcast_to(allowed, (T, S))


def rule(T: int, S: int, ok) -> np.ndarray:
    """A framework's rule ``ok(i, j)`` evaluated pair by pair: the (T, S) allowed pairs."""
    return np.array([[bool(ok(i, j)) for j in range(S)] for i in range(T)], dtype=bool).reshape(
        T, S
    )


def mismatches(T: int, S: int, opts: dict, expected: np.ndarray) -> int:
    return int((dense(T, S, opts) != expected).sum())


def assert_same(T: int, S: int, opts: dict, expected: np.ndarray) -> None:
    got = dense(T, S, opts)
    assert np.array_equal(got, expected), (
        f"T={T}, S={S}, options {opts}\nframework:\n{expected.astype(int)}\n"
        f"attention_ref:\n{got.astype(int)}"
    )


# ---------------------------------------------------------------------------------------------
# The frameworks' rules, transcribed from their sources
# ---------------------------------------------------------------------------------------------


def flash_doc_rule(T, S, left, right, causal):
    """flash_attn/flash_attn_interface.py, flash_attn_func's docstring: query i attends keys in
    [i + seqlen_k - seqlen_q - window_size[0], i + seqlen_k - seqlen_q + window_size[1]]
    inclusive (-1 = unbounded); causal aligned to the bottom right."""

    def ok(i, j):
        ip = i + S - T
        return (
            (left == -1 or j >= ip - left)
            and (right == -1 or j <= ip + right)
            and (not causal or j <= ip)
        )

    return rule(T, S, ok)


def flash_kernel_rule(T, S, left, right, causal):
    """csrc/flash_attn/flash_api.cpp (mha_fwd, set_params_fprop) and csrc/flash_attn/src/mask.h
    (Mask::apply_mask): the window as FlashAttention-2's CUDA kernels apply it."""
    # mha_fwd
    if left >= S:
        left = -1
    if right >= S:
        right = -1
    if T == 1:  # "causal=true is the same as causal=false in this case"
        causal = False
    if causal:
        right = 0
    # set_params_fprop
    is_causal = left < 0 and right == 0
    if left < 0 and right >= 0:
        left = S
    if left >= 0 and right < 0:
        right = S
    # flash_fwd_launch_template.h: LOCAL_SWITCH((left >= 0 || right >= 0) && !Is_causal)
    is_local = (left >= 0 or right >= 0) and not is_causal

    def ok(i, j):
        limit_left = max(0, i + S - T - left)
        limit_right = min(S, i + 1 + S - T + right)
        if is_causal:
            return j < limit_right
        if is_local:
            return limit_left <= j < limit_right
        return True

    return rule(T, S, ok)


def xformers_causal_local_rule(T, S, window_size, from_bottomright):
    """xformers/ops/fmha/attn_bias.py, _materialize_causal_mask: torch.tril(diagonal=shift) keeps
    j - i <= shift, torch.triu(diagonal=shift - window_size + 1) keeps j - i >= that."""
    shift = S - T if from_bottomright else 0
    return rule(T, S, lambda i, j: shift - window_size + 1 <= j - i <= shift)


def xformers_local_rule(T, S, window_left, window_right):
    """LocalAttentionFromBottomRightMask.materialize: torch.triu(diagonal=shift - window_left),
    torch.tril(diagonal=shift + window_right), shift = num_keys - num_queries."""
    shift = S - T
    return rule(T, S, lambda i, j: shift - window_left <= j - i <= shift + window_right)


def hf_sliding_rule(T, S, W, q_offset, kv_offset):
    """transformers/masking_utils.py: sliding_window_overlay (kv_idx > q_idx - sliding_window)
    and causal_mask_function (kv_idx <= q_idx) on q_idx = q_offset + i, kv_idx = kv_offset + j
    (sdpa_mask's q_arange and kv_arange)."""

    def ok(i, j):
        q_idx, kv_idx = q_offset + i, kv_offset + j
        return kv_idx > q_idx - W and kv_idx <= q_idx

    return rule(T, S, ok)


def hf_bidirectional_rule(T, S, W, q_offset, kv_offset):
    """sliding_window_bidirectional_overlay: abs(q_idx - kv_idx) <= sliding_window."""
    return rule(T, S, lambda i, j: abs((q_offset + i) - (kv_offset + j)) <= W)


def hf_chunked_rule(T, S, C, q_offset, kv_offset, left_padding=0):
    """chunked_overlay ((kv_idx - left_padding) // C == (q_idx - left_padding) // C) and
    causal_mask_function."""

    def ok(i, j):
        q_idx, kv_idx = q_offset + i, kv_offset + j
        return (kv_idx - left_padding) // C == (q_idx - left_padding) // C and kv_idx <= q_idx

    return rule(T, S, ok)


def jax_rule(T, S, left, right, is_causal):
    """jax/_src/nn/functions.py: _get_window_mask (query_pos <= key_pos + left and query_pos >=
    key_pos - right on range(T), range(S)) and _get_causal_mask (tril(ones((T, S))))."""
    return rule(T, S, lambda i, j: i <= j + left and i >= j - right and (not is_causal or j <= i))


def flex_rule(T, S, W, causal):
    """The FlexAttention blog's sliding_window_causal mask_mod, on raw indices."""
    return rule(T, S, lambda q, kv: q - kv <= W and (not causal or q >= kv))


def streaming_llm_pattern(S, start_size, recent_size):
    """Which keys the query at each position p < S attends, decoding one token at a time as
    streaming-llm's examples/eval_long_ppl.py does: the model's forward appends p's key to the
    cache and attends the cache; then StartRecentKVCache.__call__ (streaming_llm/kv_cache.py)
    keeps the first start_size and the last recent_size keys once there are more than both."""
    cache: list[int] = []  # the positions of the cached keys
    rows = np.zeros((S, S), dtype=bool)
    for p in range(S):
        cache = cache + [p]
        rows[p, cache] = True
        seq_len = len(cache)
        if seq_len > start_size + recent_size:
            cache = cache[0:start_size] + cache[seq_len - recent_size : seq_len]
    return rows


def streaming_llm_doc_rule(T, S, start_size, recent_size):
    """The converter's documented reading: j <= i' and (j < start_size or j >= i' - recent_size),
    i' = i + S - T."""

    def ok(i, j):
        ip = i + S - T
        return j <= ip and (j < start_size or j >= ip - recent_size)

    return rule(T, S, ok)


# ---------------------------------------------------------------------------------------------
# The output form
# ---------------------------------------------------------------------------------------------

EXAMPLES = {
    "flash_attn": lambda: window_from_flash_attn((2, 0)),
    "flash_attn_kernel": lambda: window_from_flash_attn((2, -1), seqlen_k=3),
    "xformers": lambda: window_from_xformers(
        "BlockDiagonalCausalLocalAttentionFromBottomRightMask", window_size=3
    ),
    "sliding_window": lambda: window_from_sliding_window(3),
    "jax": lambda: window_from_jax((1, 2), is_causal=False),
    "flex": lambda: window_from_flex_sliding_window(2),
    "chunked": lambda: window_from_chunked(3),
    "streaming_llm": lambda: window_from_streaming_llm(1, 2),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_converter_returns_the_five_option_keywords(name):
    opts = EXAMPLES[name]()
    assert isinstance(opts, dict) and tuple(opts) == KEYS, opts
    assert isinstance(opts["causal"], bool) and opts["align"] in ("top_left", "bottom_right")
    if opts["causal"] and opts["window"] is not None:
        assert opts["window"][1] == 0  # the causal rule bounds the right side: written 0


def test_written_form_unbounded_window_is_none_and_causal_right_side_is_zero():
    assert window_from_flash_attn((-1, -1))["window"] is None
    assert window_from_flash_attn((-1, 3))["window"] == (None, 3)
    assert window_from_flash_attn((4, 3), causal=True)["window"] == (4, 0)
    assert window_from_flash_attn((-1, 3), causal=True)["window"] is None
    assert window_from_jax(None)["window"] is None
    assert window_from_jax((5, 7), is_causal=True)["window"] == (5, 0)
    assert window_from_sliding_window(None) == {
        "causal": True,
        "align": "bottom_right",
        "window": None,
        "chunk_size": None,
        "sink_tokens": 0,
    }


# ---------------------------------------------------------------------------------------------
# FlashAttention: its docstring's formula and its CUDA kernels' normalisation
# ---------------------------------------------------------------------------------------------

FLASH_WINDOWS = [(-1, -1), (0, 0), (1, 0), (0, 2), (2, 1), (3, -1), (-1, 1), (10, 10), (7, 0)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size", FLASH_WINDOWS)
@pytest.mark.parametrize("T,S", SHAPES)
def test_flash_attn_against_its_docstring_formula(T, S, window_size, causal):
    opts = window_from_flash_attn(window_size, causal=causal)
    assert opts["align"] == "bottom_right"
    assert_same(T, S, opts, flash_doc_rule(T, S, *window_size, causal))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size", FLASH_WINDOWS)
@pytest.mark.parametrize("T,S", SHAPES + [(9, 3), (2, 2)])
def test_flash_attn_against_its_cuda_kernels_when_seqlen_k_is_given(T, S, window_size, causal):
    opts = window_from_flash_attn(window_size, causal=causal, seqlen_k=S)
    assert_same(T, S, opts, flash_kernel_rule(T, S, *window_size, causal))
    if T <= S:  # the two readings differ only with more queries than keys
        assert_same(T, S, opts, flash_doc_rule(T, S, *window_size, causal))


def test_flash_attn_kernel_and_docstring_differ_with_more_queries_than_keys():
    """A one-sided window: the kernel's -1 -> seqlen_k is bounded when seqlen_q > seqlen_k + 1,
    and a side >= seqlen_k is dropped."""
    T, S = 9, 3
    doc, kernel = flash_doc_rule(T, S, 1, -1, False), flash_kernel_rule(T, S, 1, -1, False)
    assert not kernel[0].any() and doc[0].all()  # T > 2 S: the kernel's first row is empty
    assert_same(T, S, window_from_flash_attn((1, -1)), doc)
    assert_same(T, S, window_from_flash_attn((1, -1), seqlen_k=S), kernel)
    doc, kernel = flash_doc_rule(T, S, 3, 3, False), flash_kernel_rule(T, S, 3, 3, False)
    assert kernel.all() and not doc.all()  # (3, 3) with S = 3: both sides dropped by the kernel
    assert window_from_flash_attn((3, 3), seqlen_k=S)["window"] is None


def test_flash_attn_wrong_alignment_fails_the_check():
    """Reading FlashAttention's window top-left (as JAX's) is caught by the same comparison."""
    for T, S in [(3, 7), (7, 3)]:
        expected = flash_doc_rule(T, S, 1, 0, False)
        opts = window_from_flash_attn((1, 0))
        assert mismatches(T, S, opts, expected) == 0
        assert mismatches(T, S, {**opts, "align": "top_left"}, expected) > 0


# ---------------------------------------------------------------------------------------------
# xformers
# ---------------------------------------------------------------------------------------------

CAUSAL_LOCAL = [n for n, (kind, _, _) in XFORMERS_LOCAL_BIASES.items() if kind == "window_size"]
LEFT_RIGHT = [n for n, (kind, _, _) in XFORMERS_LOCAL_BIASES.items() if kind == "left_right"]


@pytest.mark.parametrize("window_size", [1, 2, 3, 9])
@pytest.mark.parametrize("name", CAUSAL_LOCAL)
@pytest.mark.parametrize("T,S", SHAPES)
def test_xformers_causal_local_classes_against_materialize(T, S, name, window_size):
    opts = window_from_xformers(name, window_size=window_size)
    from_bottomright = name != "BlockDiagonalCausalLocalAttentionMask"
    assert_same(T, S, opts, xformers_causal_local_rule(T, S, window_size, from_bottomright))
    assert opts["window"] == (window_size - 1, 0)  # window_size counts the query's own key


@pytest.mark.parametrize("window", [(0, 0), (1, 2), (2, 0), (0, 3), (8, 8)])
@pytest.mark.parametrize("name", LEFT_RIGHT)
@pytest.mark.parametrize("T,S", SHAPES)
def test_xformers_left_right_classes_against_materialize(T, S, name, window):
    opts = window_from_xformers(name, window_left=window[0], window_right=window[1])
    assert_same(T, S, opts, xformers_local_rule(T, S, *window))


def test_xformers_local_attention_docstring_examples():
    """LocalAttentionFromBottomRightMask's docstring prints these for window_left=1,
    window_right=2."""
    opts = window_from_xformers("LocalAttentionFromBottomRightMask", window_left=1, window_right=2)
    printed_4x4 = [[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]
    printed_4x5 = [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert_same(4, 4, opts, np.array(printed_4x4, dtype=bool))
    assert_same(4, 5, opts, np.array(printed_4x5, dtype=bool))


@pytest.mark.parametrize("T,S", [(3, 7), (7, 3), (4, 4)])
def test_xformers_materialize_run_with_torch_tril_triu(T, S):
    """_materialize_causal_mask and LocalAttentionFromBottomRightMask.materialize, run with the
    torch calls they make."""
    torch = require_torch()
    ones = torch.ones(T, S)
    shift = S - T
    for w in (1, 2, 4):
        theirs = torch.triu(torch.tril(ones, diagonal=shift), diagonal=shift - w + 1).bool()
        opts = window_from_xformers(
            "LowerTriangularFromBottomRightLocalAttentionMask", window_size=w
        )
        assert_same(T, S, opts, theirs.numpy())
        top_left = torch.triu(torch.tril(ones, diagonal=0), diagonal=0 - w + 1).bool()
        opts = window_from_xformers("BlockDiagonalCausalLocalAttentionMask", window_size=w)
        assert_same(T, S, opts, top_left.numpy())
    for wl, wr in ((0, 0), (1, 2), (3, 0)):
        theirs = torch.tril(torch.triu(ones, diagonal=shift - wl), diagonal=shift + wr).bool()
        opts = window_from_xformers(
            "LocalAttentionFromBottomRightMask", window_left=wl, window_right=wr
        )
        assert_same(T, S, opts, theirs.numpy())


def test_xformers_reads_bias_objects_and_classes_by_name():
    """A bias object is read by its class name (or its nearest listed base) and attributes."""

    class LowerTriangularFromBottomRightLocalAttentionMask:  # stands in for xformers' class
        def __init__(self, window_size):
            self._window_size = window_size

    class Paged(LowerTriangularFromBottomRightLocalAttentionMask):
        pass

    class LocalAttentionFromBottomRightMask:
        def __init__(self, window_left, window_right):
            self.window_left, self.window_right = window_left, window_right

    by_name = window_from_xformers(
        "LowerTriangularFromBottomRightLocalAttentionMask", window_size=3
    )
    assert window_from_xformers(LowerTriangularFromBottomRightLocalAttentionMask(3)) == by_name
    assert window_from_xformers(Paged(3)) == by_name
    assert window_from_xformers(Paged, window_size=3) == by_name
    assert window_from_xformers(LocalAttentionFromBottomRightMask(1, 2))["window"] == (1, 2)


def test_xformers_real_classes_when_installed():
    pytest.importorskip("xformers")
    from xformers.ops.fmha import attn_bias

    for T, S in [(3, 7), (4, 4)]:
        bias = attn_bias.LowerTriangularFromBottomRightLocalAttentionMask(2)
        theirs = np.isfinite(bias.materialize((T, S)).numpy())
        assert_same(T, S, window_from_xformers(bias), theirs)
        bias = attn_bias.LocalAttentionFromBottomRightMask(window_left=1, window_right=2)
        theirs = np.isfinite(bias.materialize((T, S)).numpy())
        assert_same(T, S, window_from_xformers(bias), theirs)


def test_xformers_window_size_not_counting_the_diagonal_fails_the_check():
    T, S = 3, 7
    expected = xformers_causal_local_rule(T, S, 2, True)
    opts = window_from_xformers("LowerTriangularFromBottomRightLocalAttentionMask", window_size=2)
    assert mismatches(T, S, opts, expected) == 0
    assert mismatches(T, S, {**opts, "window": (2, 0)}, expected) > 0  # window_size as "left"


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers / gpt-oss sliding_window
# ---------------------------------------------------------------------------------------------


def offsets(T, S, align, past=4):
    """(q_offset, kv_offset) of a Hugging Face call whose keys and queries sit like ``align``:
    bottom-right is q_offset - kv_offset = S - T (a cache, queries last; kv_offset > 0 when the
    cache has dropped old keys), top-left is q_offset == kv_offset."""
    if align == "top_left":
        return past, past
    return (past + S - T, past) if S >= T else (past, past + T - S)


@pytest.mark.parametrize("past", [0, 5])
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
@pytest.mark.parametrize("W", [1, 2, 3, 12])
@pytest.mark.parametrize("T,S", SHAPES)
def test_hf_sliding_window_against_masking_utils(T, S, W, align, past):
    opts = window_from_sliding_window(W, align=align)
    q_offset, kv_offset = offsets(T, S, align, past)
    assert_same(T, S, opts, hf_sliding_rule(T, S, W, q_offset, kv_offset))
    assert dense(T, S, opts).sum(axis=1).max() <= W  # W keys, the query's own included


@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
@pytest.mark.parametrize("W", [0, 1, 2, 9])
@pytest.mark.parametrize("T,S", SHAPES)
def test_hf_bidirectional_sliding_window_against_masking_utils(T, S, W, align):
    opts = window_from_sliding_window(W, bidirectional=True, align=align)
    q_offset, kv_offset = offsets(T, S, align)
    assert_same(T, S, opts, hf_bidirectional_rule(T, S, W, q_offset, kv_offset))


def test_hf_sdpa_mask_docstring_examples():
    """sdpa_mask's docstring: sliding_window=3 and chunk_size=3 on a 5 x 5 mask."""
    sliding = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    chunked = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert_same(5, 5, window_from_sliding_window(3), np.array(sliding, dtype=bool))
    assert_same(5, 5, window_from_chunked(3), np.array(chunked, dtype=bool))


@pytest.mark.parametrize("W", [1, 2, 4, 9])
def test_gpt_oss_references(W):
    """gpt_oss/torch/model.py, sdpa: triu(-inf, diagonal=1) + tril(-inf, diagonal=-W) (T = S);
    gpt_oss/triton/attention.py, attention_ref: pos_keys > pos_queries or pos_keys <
    pos_queries - W + 1, pos_queries = arange(num_queries) + start_q."""
    n = 7
    full = np.full((n, n), -np.inf)
    torch_model = np.triu(full, k=1) + np.tril(full, k=-W)
    assert_same(n, n, window_from_sliding_window(W), np.isfinite(torch_model))
    for T, S in [(1, 7), (3, 7)]:
        pos_keys, pos_queries = np.arange(S), np.arange(T) + (S - T)  # start_q = S - T
        masked = (pos_keys[None, :] > pos_queries[:, None]) | (
            pos_keys[None, :] < pos_queries[:, None] - W + 1
        )
        assert_same(T, S, window_from_sliding_window(W), ~masked)


def test_hf_sliding_window_read_as_a_distance_fails_the_check():
    """Flex's reading (window W back, W + 1 keys) for Hugging Face's W is caught."""
    for T, S in [(3, 7), (8, 5)]:
        expected = hf_sliding_rule(T, S, 3, *offsets(T, S, "bottom_right"))
        assert mismatches(T, S, window_from_sliding_window(3), expected) == 0
        flex_reading = window_from_flex_sliding_window(3) | {"align": "bottom_right"}
        assert mismatches(T, S, flex_reading, expected) > 0
        assert mismatches(T, S, window_from_sliding_window(3, align="top_left"), expected) > 0


# ---------------------------------------------------------------------------------------------
# JAX: run jax.nn.dot_product_attention
# ---------------------------------------------------------------------------------------------

JAX_CASES = [
    ((3, 7), (1, 0), False),
    ((3, 7), 0, False),
    ((3, 7), (0, 3), True),
    ((7, 3), (0, 0), False),
    ((7, 3), (2, 1), True),
    ((7, 3), (1, 0), True),
    ((5, 5), 2, False),
    ((3, 7), (10, 10), False),
    ((1, 6), (0, 2), False),
    ((6, 1), (1, 1), True),
    ((3, 7), None, True),
]


def run_jax(jax, q, k, v, **kwargs):
    """jax.nn.dot_product_attention on (B, H, T, D) float64 arrays, result (B, H, T, Dv)."""
    with jax.enable_x64(True):
        out = jax.nn.dot_product_attention(
            *(jax.numpy.asarray(bthd_from_bhtd(x)) for x in (q, k, v)), **kwargs
        )
    return bhtd_from_bthd(np.asarray(out))


@pytest.mark.parametrize("shape,local_window_size,is_causal", JAX_CASES)
def test_jax_against_dot_product_attention(rng, shape, local_window_size, is_causal):
    jax = require_jax()
    (T, S), B, H, Hkv = shape, 2, 4, 2
    opts = window_from_jax(local_window_size, is_causal=is_causal)
    kwargs = dict(local_window_size=local_window_size, is_causal=is_causal)
    # JAX gives a row with no key uniform weights (JAX_EMPTY_ROWS in the JAX adapter)
    ours = dict(opts, empty_rows="uniform")

    # the pattern: equal scores and one-hot values make the output the attention weights
    zeros, eye = np.zeros((B, H, T, S)), np.broadcast_to(np.eye(S), (B, Hkv, S, S)).copy()
    weights = run_jax(jax, zeros, np.zeros((B, Hkv, S, S)), eye, **kwargs)
    expected = scaled_dot_product_attention(zeros, np.zeros((B, Hkv, S, S)), eye, **ours)
    np.testing.assert_allclose(weights, expected, atol=1e-6, rtol=0)

    # random inputs (JAX's softmax is float32 even under x64)
    q, k, v = (
        rng.normal(size=(B, H, T, 8)),
        rng.normal(size=(B, Hkv, S, 8)),
        rng.normal(size=(B, Hkv, S, 8)),
    )
    out = run_jax(jax, q, k, v, **kwargs)
    np.testing.assert_allclose(out, scaled_dot_product_attention(q, k, v, **ours), atol=1e-5)

    # the other alignment disagrees wherever it allows other pairs (with one key, an empty row's
    # uniform weights equal a full row's: nothing to tell apart)
    other = dict(opts, align="bottom_right")
    if S > 1 and not np.array_equal(dense(T, S, opts), dense(T, S, other)):
        wrong = scaled_dot_product_attention(
            zeros, np.zeros((B, Hkv, S, S)), eye, **other, empty_rows="uniform"
        )
        assert np.abs(weights - wrong).max() > 0.1


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("window", [0, 1, 3, (0, 1), (2, 0), (1, 4), (20, 20)])
@pytest.mark.parametrize("T,S", SHAPES)
def test_jax_against_get_window_mask(T, S, window, is_causal):
    left, right = (window, window) if isinstance(window, int) else window
    assert_same(T, S, window_from_jax(window, is_causal), jax_rule(T, S, left, right, is_causal))


# ---------------------------------------------------------------------------------------------
# FlexAttention: create_mask of the tutorial's mask_mod, and flex_attention
# ---------------------------------------------------------------------------------------------

FLEX_CASES = [
    (3, 7, 1, True),
    (7, 3, 1, True),
    (7, 3, 0, True),
    (3, 7, 0, False),
    (7, 3, 2, False),
    (5, 5, 2, True),
    (6, 1, 0, True),
    (1, 6, 10, True),
]


@pytest.mark.parametrize("T,S,W,causal", FLEX_CASES)
def test_flex_sliding_window_against_create_mask_and_flex_attention(rng, T, S, W, causal):
    require_torch()
    import torch
    from torch.nn.attention import flex_attention as fa

    def sliding_window_causal(b, h, q_idx, kv_idx):  # the blog post's mask_mod
        causal_mask = q_idx >= kv_idx
        window_mask = q_idx - kv_idx <= W
        return causal_mask & window_mask

    def sliding_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= W

    mask_mod = sliding_window_causal if causal else sliding_window
    B, H, Hkv = 2, 4, 2
    opts = window_from_flex_sliding_window(W, causal=causal)
    theirs = fa.create_mask(mask_mod, B, H, T, S, device="cpu").numpy()  # (B, H, T, S)
    assert theirs.shape == (B, H, T, S)
    for b in range(B):
        for h in range(H):
            assert_same(T, S, opts, theirs[b, h])
    assert_same(T, S, opts, flex_rule(T, S, W, causal))

    q, k, v = (
        rng.normal(size=(B, H, T, 8)),
        rng.normal(size=(B, Hkv, S, 8)),
        rng.normal(size=(B, Hkv, S, 5)),
    )
    block_mask = fa.create_block_mask(mask_mod, B, H, T, S, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention (no torch.compile) warns
        out = fa.flex_attention(
            *(torch.from_numpy(x) for x in (q, k, v)), block_mask=block_mask, enable_gqa=True
        ).numpy()
    np.testing.assert_allclose(out, scaled_dot_product_attention(q, k, v, **opts), atol=1e-12)


def test_flex_window_read_as_a_key_count_fails_the_check():
    T, S = 7, 3
    expected = flex_rule(T, S, 2, True)
    assert mismatches(T, S, window_from_flex_sliding_window(2), expected) == 0
    assert mismatches(T, S, window_from_sliding_window(2, align="top_left"), expected) > 0


# ---------------------------------------------------------------------------------------------
# Llama 4 chunked attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("past", [0, 6])
@pytest.mark.parametrize("C", [1, 2, 3, 4, 20])
@pytest.mark.parametrize("T,S", SHAPES)
def test_chunked_against_hf_chunked_causal_mask_function(T, S, C, past):
    """The keys start at a chunk boundary, position ``past * C`` (0: a full cache). Bottom-right:
    q_offset - kv_offset = S - T (for T > S the rule is read with the queries' first positions
    before the keys'); top-left: q_offset == kv_offset."""
    start = past * C
    bottom_right = hf_chunked_rule(T, S, C, start + S - T, start)
    assert_same(T, S, window_from_chunked(C), bottom_right)
    top_left = hf_chunked_rule(T, S, C, start, start)
    assert_same(T, S, window_from_chunked(C, align="top_left"), top_left)


@pytest.mark.parametrize("C", [1, 2, 3, 8])
def test_chunked_against_meta_llama4_reference(C):
    """meta-llama/llama-models, models/llama4/model.py, create_chunked_attention_mask:
    (block_pos == 0) & (token_pos <= 0), block_pos = |j // C - i // C|, token_pos = j - i."""
    n = 7
    pos = np.arange(n)
    block_pos = np.abs(pos[None, :] // C - pos[:, None] // C)
    token_pos = pos[None, :] - pos[:, None]
    assert_same(n, n, window_from_chunked(C), (block_pos == 0) & (token_pos <= 0))


def test_chunked_checks_can_fail():
    """A cache that has dropped keys (kv_offset not a multiple of C) or left padding moves the
    chunk boundaries: not this pattern, and the comparison says so; so does top-left."""
    T, S, C = 3, 7, 3
    opts = window_from_chunked(C)
    assert mismatches(T, S, opts, hf_chunked_rule(T, S, C, S - T, 0)) == 0
    assert mismatches(T, S, opts, hf_chunked_rule(T, S, C, S - T + 1, 1)) > 0
    assert mismatches(T, S, opts, hf_chunked_rule(T, S, C, S - T, 0, left_padding=1)) > 0
    assert mismatches(T, S, {**opts, "align": "top_left"}, hf_chunked_rule(T, S, C, S - T, 0)) > 0


# ---------------------------------------------------------------------------------------------
# StreamingLLM: the cache eviction, simulated
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recent_size", [0, 1, 2, 5, 20])
@pytest.mark.parametrize("start_size", [0, 1, 4])
@pytest.mark.parametrize("T,S", [(1, 12), (3, 12), (12, 12), (5, 7)])
def test_streaming_llm_against_start_recent_kv_cache(T, S, start_size, recent_size):
    opts = window_from_streaming_llm(start_size, recent_size)
    stream = streaming_llm_pattern(S, start_size, recent_size)
    assert_same(T, S, opts, stream[S - T :])  # the last T queries of the stream
    assert_same(T, S, opts, streaming_llm_doc_rule(T, S, start_size, recent_size))


@pytest.mark.parametrize("start_size,recent_size", [(0, 0), (1, 2), (4, 1), (2, 9)])
@pytest.mark.parametrize("T,S", [(7, 3), (6, 1)])
def test_streaming_llm_more_queries_than_keys_follows_the_documented_rule(
    T, S, start_size, recent_size
):
    opts = window_from_streaming_llm(start_size, recent_size)
    assert_same(T, S, opts, streaming_llm_doc_rule(T, S, start_size, recent_size))


def test_streaming_llm_window_counting_the_own_key_fails_the_check():
    S = 12
    stream = streaming_llm_pattern(S, 2, 3)
    opts = window_from_streaming_llm(2, 3)
    assert mismatches(1, S, opts, stream[-1:]) == 0
    assert stream[-1].sum() == 2 + 3 + 1  # sinks, recent_size earlier keys, its own
    assert mismatches(1, S, {**opts, "window": (2, 0)}, stream[-1:]) > 0  # recent_size incl. own
    assert mismatches(1, S, {**opts, "sink_tokens": 0}, stream[-1:]) > 0


# ---------------------------------------------------------------------------------------------
# Every converter's output in scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------

END_TO_END = {
    "flash_attn": (
        lambda: window_from_flash_attn((2, 1)),
        lambda T, S: flash_doc_rule(T, S, 2, 1, False),
    ),
    "flash_attn_kernel": (
        lambda: window_from_flash_attn((1, -1), seqlen_k=3),
        lambda T, S: flash_kernel_rule(T, S, 1, -1, False),
    ),
    "xformers": (
        lambda: window_from_xformers(
            "LowerTriangularFromBottomRightLocalAttentionMask", window_size=2
        ),
        lambda T, S: xformers_causal_local_rule(T, S, 2, True),
    ),
    "sliding_window": (
        lambda: window_from_sliding_window(2),
        lambda T, S: hf_sliding_rule(T, S, 2, *offsets(T, S, "bottom_right")),
    ),
    "jax": (lambda: window_from_jax((1, 2)), lambda T, S: jax_rule(T, S, 1, 2, False)),
    "flex": (lambda: window_from_flex_sliding_window(1), lambda T, S: flex_rule(T, S, 1, True)),
    "chunked": (
        lambda: window_from_chunked(2),
        lambda T, S: hf_chunked_rule(T, S, 2, S - T, 0),
    ),
    "streaming_llm": (
        lambda: window_from_streaming_llm(1, 1),
        lambda T, S: streaming_llm_doc_rule(T, S, 1, 1),
    ),
}


@pytest.mark.parametrize("T,S", [(3, 7), (7, 3)])
@pytest.mark.parametrize("name", sorted(END_TO_END))
def test_converted_options_run_in_scaled_dot_product_attention(rng, name, T, S):
    convert, framework_rule = END_TO_END[name]
    opts = convert()
    B, H, Hkv = 2, 4, 2
    q, k, v = (
        rng.normal(size=(B, H, T, 6)),
        rng.normal(size=(B, Hkv, S, 6)),
        rng.normal(size=(B, Hkv, S, 5)),
    )
    out = scaled_dot_product_attention(q, k, v, **opts)
    assert out.shape == (B, H, T, 5) and np.isfinite(out).all()
    # attention under the framework's own rule, given as an explicit boolean mask
    expected = scaled_dot_product_attention(q, k, v, mask=framework_rule(T, S))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

ERRORS = [
    (
        window_from_flash_attn,
        ((3, -2),),
        {},
        ValueError,
        r"window_size\[1\] \(right\) must be -1 \(unbounded\) or an int >= 0; got -2",
    ),
    (window_from_flash_attn, (3,), {}, TypeError, r"window_size must be a pair \(left, right\)"),
    (
        window_from_flash_attn,
        ((1.5, 0),),
        {},
        TypeError,
        r"window_size\[0\] \(left\) must be -1 \(unbounded\) or an int >= 0; got 1.5 \(float\)",
    ),
    (
        window_from_flash_attn,
        ((1, 0),),
        {"causal": 1},
        TypeError,
        r"causal must be a bool; got 1 \(int\)",
    ),
    (
        window_from_flash_attn,
        ((1, 0),),
        {"seqlen_k": 0},
        ValueError,
        r"seqlen_k must be a positive int; got 0",
    ),
    (
        window_from_xformers,
        ("NoSuchMask",),
        {"window_size": 2},
        ValueError,
        r"bias must name an xformers local-attention bias class, one of \[.*\]; got 'NoSuchMask'",
    ),
    (
        window_from_xformers,
        (object(),),
        {},
        TypeError,
        r"bias must be an xformers local-attention bias .*; got object",
    ),
    (
        window_from_xformers,
        ("LowerTriangularFromBottomRightLocalAttentionMask",),
        {"window_size": 0},
        ValueError,
        r"window_size must be a positive int \(xformers: > 0\); got 0",
    ),
    (
        window_from_xformers,
        ("LowerTriangularFromBottomRightLocalAttentionMask",),
        {},
        TypeError,
        r"needs window_size \(a positive int\); got none",
    ),
    (
        window_from_xformers,
        ("LocalAttentionFromBottomRightMask",),
        {"window_size": 2},
        TypeError,
        r"LocalAttentionFromBottomRightMask takes window_left and window_right, "
        r"not \['window_size'\]",
    ),
    (
        window_from_xformers,
        ("LocalAttentionFromBottomRightMask",),
        {"window_left": 1},
        TypeError,
        r"needs window_left and window_right \(ints >= 0\); \['window_right'\] missing",
    ),
    (
        window_from_xformers,
        ("LocalAttentionFromBottomRightMask",),
        {"window_left": -1, "window_right": 0},
        ValueError,
        r"window_left must be an int >= 0; got -1",
    ),
    (
        window_from_sliding_window,
        (0,),
        {},
        ValueError,
        r"sliding_window must be a positive int \(the keys a query sees, its own included\) "
        r"or None; got 0 \(gpt-oss reads 0 as no window",
    ),
    (window_from_sliding_window, (-2,), {}, ValueError, r"sliding_window must be .*; got -2"),
    (window_from_sliding_window, (2.0,), {}, TypeError, r"sliding_window must be .*; got 2.0"),
    (window_from_sliding_window, (True,), {}, TypeError, r"sliding_window must be .*; got True"),
    (
        window_from_sliding_window,
        (-1,),
        {"bidirectional": True},
        ValueError,
        r"sliding_window must be an int >= 0 \(a distance\) or None; got -1",
    ),
    (
        window_from_sliding_window,
        (2,),
        {"align": "center"},
        ValueError,
        r"align must be one of \('top_left', 'bottom_right'\); got 'center'",
    ),
    (
        window_from_jax,
        ((-1, 2),),
        {},
        ValueError,
        r"local_window_size\[0\] \(left\) must be an int >= 0 \(attention_ref's window has no "
        r"negative side; use a mask\); got -1",
    ),
    (window_from_jax, ("3",), {}, TypeError, r"local_window_size must be an int >= 0, a pair"),
    (window_from_jax, ((1, 2, 3),), {}, TypeError, r"local_window_size must be an int or a pair"),
    (window_from_jax, (1,), {"is_causal": "yes"}, TypeError, r"is_causal must be a bool"),
    (
        window_from_flex_sliding_window,
        (-1,),
        {},
        ValueError,
        r"window must be an int >= 0 \(SLIDING_WINDOW\); got -1",
    ),
    (window_from_flex_sliding_window, (None,), {}, TypeError, r"window must be an int >= 0"),
    (
        window_from_chunked,
        (0,),
        {},
        ValueError,
        r"attention_chunk_size must be a positive int; got 0",
    ),
    (window_from_chunked, (2.5,), {}, TypeError, r"attention_chunk_size must be a positive int"),
    (window_from_streaming_llm, (-1, 4), {}, ValueError, r"start_size must be an int >= 0; got -1"),
    (
        window_from_streaming_llm,
        (4, "8"),
        {},
        TypeError,
        r"recent_size must be an int >= 0; got '8' \(str\)",
    ),
]


@pytest.mark.parametrize(
    "fn,args,kwargs,exc,message", ERRORS, ids=[f"{e[0].__name__}-{i}" for i, e in enumerate(ERRORS)]
)
def test_bad_inputs_name_the_argument_expected_and_actual(fn, args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        fn(*args, **kwargs)


def test_xformers_instance_with_window_keywords_is_refused():
    class LocalAttentionFromBottomRightMask:
        window_left, window_right = 1, 2

    with pytest.raises(TypeError, match=r"read from the instance; pass no window_left with it"):
        window_from_xformers(LocalAttentionFromBottomRightMask(), window_left=3)


def test_numpy_integers_are_accepted():
    assert window_from_jax(np.int64(2))["window"] == (2, 2)
    assert window_from_flash_attn((np.int32(1), np.int64(-1)))["window"] == (1, None)
    assert window_from_sliding_window(np.int64(3))["window"] == (2, 0)


def test_docs_windows_worked_example_runs():
    """docs/windows.md's python blocks (the worked example with T != S) run and assert."""
    page = Path(__file__).resolve().parents[1] / "docs" / "windows.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks, "docs/windows.md has no python block"
    namespace: dict = {"__name__": "docs_windows"}
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/windows.md (python block {i})", "exec"), namespace)
