"""Mask builders against the definitions of docs/conventions.md, written as loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import attention_ref as ar

SHAPES = [(3, 5), (5, 3), (4, 4), (1, 1), (1, 4), (4, 1)]


@pytest.mark.parametrize("T, S", SHAPES)
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_causal_mask_definition(T, S, align):
    m = ar.causal_mask(T, S, align=align)
    for i, j in itertools.product(range(T), range(S)):
        pos = i if align == "top_left" else i + S - T
        assert m[i, j] == (j <= pos), (i, j)


@pytest.mark.parametrize("T, S", SHAPES)
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("window", [(0, 0), (1, 0), (2, 1), (None, 1), (1, None), (None, None)])
def test_window_mask_definition(T, S, align, window):
    m = ar.window_mask(T, S, window, align=align)
    left, right = window
    for i, j in itertools.product(range(T), range(S)):
        pos = i if align == "top_left" else i + S - T
        ok = (left is None or j >= pos - left) and (right is None or j <= pos + right)
        assert m[i, j] == ok, (i, j)


def test_alignments_agree_when_t_equals_s():
    np.testing.assert_array_equal(ar.causal_mask(4, 4), ar.causal_mask(4, 4, align="bottom_right"))


def test_attention_mask_intersects_and_returns_none_when_nothing_is_masked():
    assert ar.attention_mask(3, 5) is None
    keep = np.array([True, True, True, False, True])
    m = ar.attention_mask(3, 5, mask=keep, causal=True, align="bottom_right", window=(1, None))
    expected = (
        keep[None, :]
        & ar.causal_mask(3, 5, align="bottom_right")
        & ar.window_mask(3, 5, (1, None), align="bottom_right")
    )
    np.testing.assert_array_equal(m, expected)
    assert m.shape == (3, 5)
