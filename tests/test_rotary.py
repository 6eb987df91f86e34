"""Rotary position embeddings: the tables, the rotation and its backward against independent
transcriptions of FlashAttention's and Hugging Face's formulas (and the torch snippets themselves
when torch is installed); the two pairings; partial rotary; norms and the relative-position
property; the scaling rules of transformers' modeling_rope_utils.py (linear, llama3, yarn);
the backward by finite differences, with wrong backwards shown to fail; bad inputs; no mutation.

Sources (docs/derivations/rotary.md names them with their versions):

* Dao-AILab/flash-attention, ``flash_attn/layers/rotary.py`` (commit 0251105a): ``rotate_half``,
  ``apply_rotary_emb_torch``, ``ApplyRotaryEmb.backward`` (``conjugate=True``);
* huggingface/transformers 5.25.0, ``src/transformers/models/llama/modeling_llama.py``
  (``LlamaRotaryEmbedding.forward``, ``rotate_half``, ``apply_rotary_pos_emb``),
  ``src/transformers/models/gpt_neox/modeling_gpt_neox.py`` (``apply_rotary_pos_emb`` with
  partial rotary), ``src/transformers/models/gptj/modeling_gptj.py`` (``rotate_every_two``,
  ``apply_rotary_pos_emb``: interleaved) and ``src/transformers/modeling_rope_utils.py``
  (``_compute_linear_scaling_rope_parameters``, ``_compute_llama3_parameters``,
  ``_compute_yarn_parameters``, ``yarn_get_mscale``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import require_torch

from attention_ref import scaled_dot_product_attention, scaled_dot_product_attention_backward
from attention_ref.core.rotary import (
    apply_rotary,
    apply_rotary_backward,
    rotary_cos_sin,
    rotary_inv_freq,
)
from attention_ref.gradcheck import check_vjp

#: Agreement with the transcriptions: the same float64 products and sums, possibly in another
#: order or with ``1 / base**e`` against ``base**-e``, so a few ulps of values of size ~1.
RTOL = 1e-13
#: A wrong convention or backward is off by O(1); anything above this is a clear failure.
WRONG_MIN = 1e-2

# ----------------------------------------------------------------------------- references

# FlashAttention, flash_attn/layers/rotary.py, transcribed in NumPy (layout (B, T, H, D)).


def fa_rotate_half(x, interleaved=False):
    if not interleaved:
        x1, x2 = np.split(x, 2, axis=-1)  # x.chunk(2, dim=-1)
        return np.concatenate((-x2, x1), axis=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    # rearrange(torch.stack((-x2, x1), dim=-1), "... d two -> ... (d two)", two=2)
    return np.stack((-x2, x1), axis=-1).reshape(x.shape)


def fa_repeat(t, interleaved):
    """einops ``repeat(t, "... d -> ... 1 (2 d)")``, or ``"... d -> ... 1 (d 2)"`` interleaved."""
    full = np.repeat(t, 2, axis=-1) if interleaved else np.concatenate([t, t], axis=-1)
    return full[..., None, :]


def fa_apply_rotary_emb_torch(x, cos, sin, interleaved=False):
    """x (batch, seqlen, nheads, headdim); cos, sin (seqlen, r/2) or (batch, seqlen, r/2)."""
    ro_dim = cos.shape[-1] * 2
    assert ro_dim <= x.shape[-1]
    cos, sin = fa_repeat(cos, interleaved), fa_repeat(sin, interleaved)
    rot = x[..., :ro_dim] * cos + fa_rotate_half(x[..., :ro_dim], interleaved) * sin
    return np.concatenate([rot, x[..., ro_dim:]], axis=-1)


# Hugging Face transformers, models/llama and models/gpt_neox, transcribed in NumPy.


def hf_default_inv_freq(base, dim):
    # 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))


def hf_rotary_embedding(inv_freq, attention_scaling, position_ids):
    """``LlamaRotaryEmbedding.forward``: position_ids (B, T) -> cos, sin (B, T, r)."""
    freqs = position_ids[..., None].astype(np.float64) * inv_freq
    emb = np.concatenate((freqs, freqs), axis=-1)
    return np.cos(emb) * attention_scaling, np.sin(emb) * attention_scaling


def hf_rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return np.concatenate((-x2, x1), axis=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """GPT-NeoX's ``apply_rotary_pos_emb`` (partial rotary); with ``cos.shape[-1]`` equal to the
    head dim it is Llama's ``(q * cos) + (rotate_half(q) * sin)``."""
    cos = np.expand_dims(cos, unsqueeze_dim)
    sin = np.expand_dims(sin, unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = (q_rot * cos) + (hf_rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (hf_rotate_half(k_rot) * sin)
    return np.concatenate([q_embed, q_pass], axis=-1), np.concatenate([k_embed, k_pass], axis=-1)


# GPT-J in transformers (models/gptj/modeling_gptj.py): the interleaved pairing, layout
# (B, T, H, D), partial rotary by slicing in GPTJAttention.forward.


def hf_gptj_create_sinusoidal_positions(num_pos, dim):
    inv_freq = 1.0 / (10000 ** (np.arange(0, dim, 2, dtype=np.int64) / dim))
    sinusoid_inp = np.arange(num_pos, dtype=np.int64).astype(np.float64)[:, None] * inv_freq
    return np.concatenate((np.sin(sinusoid_inp), np.cos(sinusoid_inp)), axis=1)


def hf_rotate_every_two(x):
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    return np.stack((-x2, x1), axis=-1).reshape(x.shape)  # x.flatten(-2)


def hf_gptj_apply_rotary_pos_emb(tensor, sin, cos):
    sin = np.repeat(sin[:, :, None, :], 2, 3)  # torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = np.repeat(cos[:, :, None, :], 2, 3)
    return (tensor * cos) + (hf_rotate_every_two(tensor) * sin)


# transformers' modeling_rope_utils.py (5.25.0), transcribed in NumPy float64.


def hf_linear(base, dim, rope):
    """``_compute_linear_scaling_rope_parameters``."""
    inv_freq = hf_default_inv_freq(base, dim)
    inv_freq /= rope["factor"]
    return inv_freq, 1.0


def hf_llama3(base, dim, rope):
    """``_compute_llama3_parameters``."""
    inv_freq = hf_default_inv_freq(base, dim)
    factor = rope["factor"]
    low_freq_factor = rope["low_freq_factor"]
    high_freq_factor = rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed_inv_freq = (
        1 - smooth_factor
    ) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return np.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0


def hf_yarn_get_mscale(scale=1, mscale=1):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def hf_yarn(base, dim, rope):
    """``_compute_yarn_parameters``."""
    factor = rope["factor"]
    attention_factor = rope.get("attention_factor")
    mscale = rope.get("mscale")
    mscale_all_dim = rope.get("mscale_all_dim")
    original_max_position_embeddings = rope["original_max_position_embeddings"]
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(
                hf_yarn_get_mscale(factor, mscale) / hf_yarn_get_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = hf_yarn_get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def find_correction_dim(num_rotations, dim, base, max_position_embeddings):
        return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    def find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings, truncate):
        low = find_correction_dim(low_rot, dim, base, max_position_embeddings)
        high = find_correction_dim(high_rot, dim, base, max_position_embeddings)
        if truncate:
            low = math.floor(low)
            high = math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(min_, max_, dim):
        if min_ == max_:
            max_ += 0.001
        linear_func = (np.arange(dim, dtype=np.float64) - min_) / (max_ - min_)
        return np.clip(linear_func, 0, 1)

    pos_freqs = base ** (np.arange(0, dim, 2).astype(np.float64) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    truncate = rope.get("truncate", True)
    low, high = find_correction_range(
        beta_fast, beta_slow, dim, base, original_max_position_embeddings, truncate
    )
    inv_freq_extrapolation_factor = 1 - linear_ramp_factor(low, high, dim // 2)
    inv_freq = (
        inv_freq_interpolation * (1 - inv_freq_extrapolation_factor)
        + inv_freq_extrapolation * inv_freq_extrapolation_factor
    )
    return inv_freq, attention_factor


HF_RULES = {"linear": hf_linear, "llama3": hf_llama3, "yarn": hf_yarn}


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ----------------------------------------------------------------------------- helpers

B, H, HKV, T, S, DK, DV = 2, 4, 2, 3, 5, 10, 4


def tables(rng, lead, T, rotary_dim, scaling=None):
    """cos, sin for random integer positions of shape lead + (T,)."""
    positions = rng.integers(0, 50, size=lead + (T,))
    return rotary_cos_sin(positions, rotary_dim, scaling=scaling)


# ----------------------------------------------------------------------------- (a) FlashAttention


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [DK, 6])
@pytest.mark.parametrize("per_batch", [False, True])
def test_matches_flash_attention_formula(rng, interleaved, rotary_dim, per_batch):
    x = rng.normal(size=(B, H, T, DK))  # ours (B, H, T, D); FlashAttention's (B, T, H, D)
    positions = rng.integers(0, 100, size=(B, T)) if per_batch else np.arange(T) + 7
    cos, sin = rotary_cos_sin(positions, rotary_dim, base=500.0)  # (B, T, r/2) or (T, r/2)
    ours_cos = cos[:, None] if per_batch else cos  # (B, 1, T, r/2): broadcast over heads
    ours_sin = sin[:, None] if per_batch else sin
    got = apply_rotary(x, ours_cos, ours_sin, interleaved=interleaved)
    expected = fa_apply_rotary_emb_torch(x.swapaxes(1, 2), cos, sin, interleaved).swapaxes(1, 2)
    assert got.shape == x.shape
    assert rel_err(got, expected) < RTOL


def test_tables_match_flash_attention_rotary_embedding_cache(rng):
    # RotaryEmbedding._update_cos_sin_cache: inv_freq = 1 / base ** (arange(0, dim, 2) / dim),
    # freqs = torch.outer(t, inv_freq), cos = torch.cos(freqs): the (T, r/2) layout.
    base, dim, T_ = 10000.0, 8, 20
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    freqs = np.outer(np.arange(T_, dtype=np.float64), inv_freq)
    cos, sin = rotary_cos_sin(np.arange(T_), dim, base=base)
    assert cos.shape == sin.shape == (T_, dim // 2)
    assert cos.dtype == sin.dtype == np.float64
    assert rel_err(cos, np.cos(freqs)) < RTOL and rel_err(sin, np.sin(freqs)) < RTOL


# ----------------------------------------------------------------------------- (b) Hugging Face


@pytest.mark.parametrize("rotary_dim", [DK, 6])
def test_matches_hugging_face_apply_rotary_pos_emb(rng, rotary_dim):
    """q (B, H, T, D) at positions (B, T), k (B, Hkv, S, D) at positions (B, S); unsqueeze_dim=1."""
    base = 10000.0
    q, k = rng.normal(size=(B, H, T, DK)), rng.normal(size=(B, HKV, S, DK))
    pos_q = rng.integers(0, 100, size=(B, T))
    pos_k = rng.integers(0, 100, size=(B, S))
    inv_freq = hf_default_inv_freq(base, rotary_dim)
    cq, sq = hf_rotary_embedding(inv_freq, 1.0, pos_q)  # (B, T, r)
    ck, sk = hf_rotary_embedding(inv_freq, 1.0, pos_k)
    # HF applies one table to q and k; with different positions, call it once for each
    q_hf, _ = hf_apply_rotary_pos_emb(q, q, cq, sq)
    _, k_hf = hf_apply_rotary_pos_emb(k, k, ck, sk)
    cos_q, sin_q = rotary_cos_sin(pos_q, rotary_dim, base=base)
    cos_k, sin_k = rotary_cos_sin(pos_k, rotary_dim, base=base)
    # HF's table is concatenate([cos, cos], -1) of ours
    assert rel_err(cq, np.concatenate([cos_q, cos_q], -1)) < RTOL
    assert rel_err(apply_rotary(q, cos_q[:, None], sin_q[:, None]), q_hf) < RTOL
    assert rel_err(apply_rotary(k, cos_k[:, None], sin_k[:, None]), k_hf) < RTOL


def test_matches_hugging_face_gptj_interleaved(rng):
    """GPT-J: sincos = embed_positions[position_ids], split into sin, cos; q_rot = q[..., :r]
    rotated with rotate_every_two, q_pass appended (GPTJAttention.forward)."""
    rotary_dim = 6
    x = rng.normal(size=(B, T, H, DK))  # GPT-J's layout before its permute to (B, H, T, D)
    position_ids = rng.integers(0, 64, size=(B, T))
    sincos = hf_gptj_create_sinusoidal_positions(64, rotary_dim)[position_ids]  # (B, T, r)
    sin, cos = np.split(sincos, 2, axis=-1)  # (B, T, r/2) each
    rot = hf_gptj_apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos)
    expected = np.concatenate([rot, x[..., rotary_dim:]], axis=-1).swapaxes(1, 2)
    ours_cos, ours_sin = rotary_cos_sin(position_ids, rotary_dim)
    got = apply_rotary(x.swapaxes(1, 2), ours_cos[:, None], ours_sin[:, None], interleaved=True)
    assert rel_err(got, expected) < RTOL
    wrong = apply_rotary(x.swapaxes(1, 2), ours_cos[:, None], ours_sin[:, None])
    assert rel_err(wrong, expected) > WRONG_MIN  # GPT-J is not the non-interleaved pairing


def test_torch_snippets_directly(rng):
    """The frameworks' torch code, run in float64 torch, against apply_rotary."""
    torch = require_torch()

    def hf_rotate_half_t(x):  # modeling_llama.py rotate_half
        x1 = x[..., : x.shape[-1] // 2]
        x2 = x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    def fa_rotate_half_t(x, interleaved=False):  # flash_attn/layers/rotary.py, einops inlined
        if not interleaved:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((-x2, x1), dim=-1)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)  # "... d two -> ... (d two)"

    q = rng.normal(size=(B, H, T, DK))
    positions = rng.integers(0, 100, size=(B, T))
    cos, sin = rotary_cos_sin(positions, DK)  # (B, T, D/2)
    qt = torch.from_numpy(q)
    # Hugging Face: emb = cat(freqs, freqs); q * cos + rotate_half(q) * sin, unsqueeze_dim=1
    ct = torch.from_numpy(np.concatenate([cos, cos], -1)).unsqueeze(1)
    st = torch.from_numpy(np.concatenate([sin, sin], -1)).unsqueeze(1)
    hf = (qt * ct) + (hf_rotate_half_t(qt) * st)
    assert rel_err(apply_rotary(q, cos[:, None], sin[:, None]), hf.numpy()) < RTOL
    # FlashAttention's apply_rotary_emb_torch, both pairings, on the (B, T, H, D) layout
    xt = qt.transpose(1, 2)
    for interleaved in (False, True):
        c = torch.from_numpy(cos)
        s = torch.from_numpy(sin)
        if interleaved:
            c, s = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
        else:
            c, s = torch.cat([c, c], dim=-1), torch.cat([s, s], dim=-1)
        c, s = c.unsqueeze(-2), s.unsqueeze(-2)  # "... d -> ... 1 (2 d)"
        fa = (xt * c + fa_rotate_half_t(xt, interleaved) * s).transpose(1, 2)
        got = apply_rotary(q, cos[:, None], sin[:, None], interleaved=interleaved)
        assert rel_err(got, fa.numpy()) < RTOL


# ----------------------------------------------------------------------------- (c) conventions


def test_the_two_pairings_differ_and_planted_bugs_are_caught(rng):
    x = rng.normal(size=(B, H, T, DK))
    cos, sin = tables(rng, (), T, DK)
    plain = apply_rotary(x, cos, sin)
    inter = apply_rotary(x, cos, sin, interleaved=True)
    assert rel_err(plain, inter) > WRONG_MIN
    fa_plain = fa_apply_rotary_emb_torch(x.swapaxes(1, 2), cos, sin, False).swapaxes(1, 2)
    # the flag ignored: the interleaved result is far from the non-interleaved reference
    assert rel_err(inter, fa_plain) > WRONG_MIN

    def swapped_halves(x):  # rotate_half returning cat(x2, -x1): the rotation by -angle
        x1, x2 = np.split(x, 2, axis=-1)
        return np.concatenate((x2, -x1), axis=-1)

    c2, s2 = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
    assert rel_err(x * c2 + swapped_halves(x) * s2, fa_plain) > WRONG_MIN
    # cos and sin swapped
    assert rel_err(apply_rotary(x, sin, cos), fa_plain) > WRONG_MIN


# ----------------------------------------------------------------------------- (d) partial rotary


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_keeps_the_tail_exactly(rng, interleaved):
    x = rng.normal(size=(B, H, T, DK))
    cos, sin = tables(rng, (), T, 4)
    out = apply_rotary(x, cos, sin, interleaved=interleaved)
    assert np.array_equal(out[..., 4:], x[..., 4:])
    assert not np.allclose(out[..., :4], x[..., :4])
    dout = rng.normal(size=x.shape)
    dx = apply_rotary_backward(dout, cos, sin, interleaved=interleaved)
    assert np.array_equal(dx[..., 4:], dout[..., 4:])


# ----------------------------------------------------------------------------- (e) properties


def pair_norms(y, rotary_dim, interleaved):
    half = rotary_dim // 2
    if interleaved:
        a, b = y[..., 0:rotary_dim:2], y[..., 1:rotary_dim:2]
    else:
        a, b = y[..., :half], y[..., half:rotary_dim]
    return np.hypot(a, b)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_preserves_pair_norms(rng, interleaved):
    x = rng.normal(size=(B, H, T, DK))
    cos, sin = tables(rng, (B, 1), T, 8)
    y = apply_rotary(x, cos, sin, interleaved=interleaved)
    assert rel_err(pair_norms(y, 8, interleaved), pair_norms(x, 8, interleaved)) < RTOL
    # YaRN's attention factor m scales every pair by m
    yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}
    m = 0.1 * math.log(8.0) + 1.0
    cos, sin = tables(rng, (B, 1), T, 8, scaling=yarn)
    y = apply_rotary(x, cos, sin, interleaved=interleaved)
    assert rel_err(pair_norms(y, 8, interleaved), m * pair_norms(x, 8, interleaved)) < RTOL


def scores(q, k, pos_q, pos_k, rotary_dim, interleaved, scaling=None, corrupt=False):
    """<R(p) q_t, R(s) k_u> for every (t, u): (T, S)."""
    cq, sq = rotary_cos_sin(pos_q, rotary_dim, scaling=scaling)
    ck, sk = rotary_cos_sin(pos_k, rotary_dim, scaling=scaling)
    if corrupt:  # a planted bug: the cos table's frequencies in reverse order
        cq, ck = cq[..., ::-1], ck[..., ::-1]
    rq = apply_rotary(q, cq, sq, interleaved=interleaved)
    rk = apply_rotary(k, ck, sk, interleaved=interleaved)
    return np.einsum("td,sd->ts", rq, rk)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}],
)
def test_scores_depend_only_on_relative_position(rng, interleaved, scaling):
    q, k = rng.normal(size=(T, DK)), rng.normal(size=(S, DK))
    pos_q, pos_k = rng.integers(0, 40, size=T), rng.integers(0, 40, size=S)
    base_scores = scores(q, k, pos_q, pos_k, 6, interleaved, scaling)
    for shift in (1, 17, 1000):
        shifted = scores(q, k, pos_q + shift, pos_k + shift, 6, interleaved, scaling)
        assert rel_err(shifted, base_scores) < 1e-11  # angles up to ~1e3: a few ulps each
    # (R9): <m R(p) q, m R(s) k> = m^2 q^T R(s - p) k on the rotated features, plus the tail's
    # q . k; apply_rotary with the tables of s - p is m R(s - p)
    m = 1.0 if scaling is None else 0.1 * math.log(4.0) + 1.0
    for t in range(T):
        for u in range(S):
            c, s = rotary_cos_sin([pos_k[u] - pos_q[t]], 6, scaling=scaling)
            rk = apply_rotary(k[u : u + 1], c, s, interleaved=interleaved)[0]  # m R(s - p) k
            tail = q[t, 6:] @ k[u, 6:]
            expected = m * (q[t] @ rk - tail) + tail
            assert abs(base_scores[t, u] - expected) < 1e-12 * max(1.0, abs(expected))
    # a table that is not a rotation breaks the property
    bad = scores(q, k, pos_q, pos_k, 6, interleaved, scaling, corrupt=True)
    bad_shifted = scores(q, k, pos_q + 17, pos_k + 17, 6, interleaved, scaling, corrupt=True)
    assert rel_err(bad_shifted, bad) > WRONG_MIN


def test_attention_with_rotary_is_shift_invariant(rng):
    """Through scaled dot-product attention (GQA, T != S, causal bottom-right)."""
    q, k, v = (
        rng.normal(size=(B, H, T, DK)),
        rng.normal(size=(B, HKV, S, DK)),
        rng.normal(size=(B, HKV, S, DV)),
    )

    def run(offsets):
        pos_k = offsets[:, None] + np.arange(S)  # (B, S)
        pos_q = pos_k[:, S - T :]  # the last T positions: decoding after a prefix
        cq, sq = rotary_cos_sin(pos_q, 6)
        ck, sk = rotary_cos_sin(pos_k, 6)
        return scaled_dot_product_attention(
            apply_rotary(q, cq[:, None], sq[:, None]),
            apply_rotary(k, ck[:, None], sk[:, None]),
            v,
            causal=True,
            align="bottom_right",
        )

    out = run(np.array([0, 0]))
    assert rel_err(run(np.array([5, 123])), out) < 1e-11


# ----------------------------------------------------------------------------- (f) scaling rules

SCALINGS = [
    ("linear", {"rope_type": "linear", "factor": 4.0}),
    (
        "llama3",
        # Llama 3.1's values, as the comments of _compute_llama3_parameters give them
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
    (
        "yarn",
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
    ),
    (
        "yarn",
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 2048,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "truncate": False,
        },
    ),
    (
        "yarn",
        {
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 1024,
            "attention_factor": 0.9,
            "mscale": 1.0,  # ignored: attention_factor given
            "mscale_all_dim": 2.0,
        },
    ),
]


@pytest.mark.parametrize(("rope_type", "rope"), SCALINGS)
@pytest.mark.parametrize(("base", "dim"), [(10000.0, 64), (500000.0, 128), (10000.0, 6)])
def test_scaling_matches_transformers_formulas(rope_type, rope, base, dim):
    expected_inv, expected_m = HF_RULES[rope_type](base, dim, rope)
    inv_freq, m = rotary_inv_freq(dim, base=base, scaling=rope)
    assert inv_freq.shape == (dim // 2,)
    assert rel_err(inv_freq, expected_inv) < RTOL
    assert m == pytest.approx(expected_m, rel=1e-15)
    # the tables: HF's cos = cos(position * inv_freq) * attention_scaling, halved
    positions = np.array([[0, 1, 5000], [7, 40000, 3]])
    c_hf, s_hf = hf_rotary_embedding(expected_inv, expected_m, positions)
    cos, sin = rotary_cos_sin(positions, dim, base=base, scaling=rope)
    assert cos.shape == positions.shape + (dim // 2,)
    # angles up to 4e4 rad: the ulp of the angle (~7e-12) bounds the agreement
    assert np.max(np.abs(cos - c_hf[..., : dim // 2])) < 1e-10
    assert np.max(np.abs(sin - s_hf[..., : dim // 2])) < 1e-10


def test_linear_scaling_is_positions_divided_by_factor():
    positions = np.arange(0, 300, 7)
    cos, sin = rotary_cos_sin(positions, 16, scaling={"rope_type": "linear", "factor": 4.0})
    cos_ref, sin_ref = rotary_cos_sin(positions / 4.0, 16)
    assert np.max(np.abs(cos - cos_ref)) < 1e-13 and np.max(np.abs(sin - sin_ref)) < 1e-13
    # the legacy "type" key and an explicit "default" are accepted
    legacy = rotary_cos_sin(positions, 16, scaling={"type": "linear", "factor": 4.0})
    assert np.array_equal(legacy[0], cos)
    default = rotary_cos_sin(positions, 16, scaling={"rope_type": "default"})
    assert np.array_equal(default[0], rotary_cos_sin(positions, 16)[0])


def test_llama3_bands():
    """Wavelengths above L / low_freq_factor are divided by the factor, those below
    L / high_freq_factor are kept exactly, and the band between lies strictly between."""
    rope = dict(SCALINGS[1][1])
    base, dim = 500000.0, 128
    plain, _ = rotary_inv_freq(dim, base=base)
    scaled, m = rotary_inv_freq(dim, base=base, scaling=rope)
    wavelen = 2 * math.pi / plain
    high, low = wavelen < 8192 / 4.0, wavelen > 8192 / 1.0
    medium = ~high & ~low
    assert high.any() and low.any() and medium.any()
    assert np.array_equal(scaled[high], plain[high])
    assert np.array_equal(scaled[low], plain[low] / 8.0)
    assert np.all(scaled[medium] < plain[medium]) and np.all(scaled[medium] > plain[medium] / 8)
    assert m == 1.0


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_fast_pairs_extrapolate_slow_pairs_interpolate(truncate):
    """Pairs turning more than beta_fast times over the original context keep their frequency;
    pairs turning fewer than beta_slow times are divided by the factor (R13)."""
    dim, base, L, f = 64, 10000.0, 4096, 8.0
    rope = {"rope_type": "yarn", "factor": f, "original_max_position_embeddings": L}
    rope["truncate"] = truncate
    plain, _ = rotary_inv_freq(dim, base=base)
    scaled, _ = rotary_inv_freq(dim, base=base, scaling=rope)
    turns = L * plain / (2 * math.pi)
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    assert np.array_equal(scaled[fast], plain[fast])
    assert np.array_equal(scaled[slow], plain[slow] / f)
    middle = ~fast & ~slow
    assert np.all(scaled[middle] <= plain[middle]) and np.all(scaled[middle] >= plain[middle] / f)


def test_yarn_attention_factor_values():
    def m_of(**extra):
        rope = {"rope_type": "yarn", "original_max_position_embeddings": 4096, **extra}
        return rotary_inv_freq(16, scaling=rope)[1]

    assert m_of(factor=4.0) == pytest.approx(1.1386294361119891, rel=1e-15)  # 0.1 ln 4 + 1
    assert m_of(factor=1.0) == 1.0  # yarn_get_mscale: 1 when scale <= 1
    assert m_of(factor=40.0, mscale=0.707, mscale_all_dim=0.707) == pytest.approx(1.0, rel=1e-15)
    ratio = (0.1 * 2.0 * math.log(40) + 1) / (0.1 * 0.5 * math.log(40) + 1)
    assert m_of(factor=40.0, mscale=2.0, mscale_all_dim=0.5) == pytest.approx(ratio, rel=1e-15)
    # `mscale and mscale_all_dim`: one of them alone falls back to yarn_get_mscale(factor)
    assert m_of(factor=40.0, mscale=2.0) == pytest.approx(0.1 * math.log(40) + 1, rel=1e-15)
    assert m_of(factor=4.0, attention_factor=0.5) == 0.5
    # and it multiplies both tables, as LlamaRotaryEmbedding.forward does
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    cos, sin = rotary_cos_sin([3.0], 16, scaling=rope)
    assert np.allclose(cos**2 + sin**2, 1.1386294361119891**2, rtol=1e-14)


def test_rope_theta_in_the_dict_must_equal_base():
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    cos, _ = rotary_cos_sin(np.arange(4), 8, base=500000.0, scaling=rope)
    plain = {"rope_type": "linear", "factor": 2.0}
    ref, _ = rotary_cos_sin(np.arange(4), 8, base=500000.0, scaling=plain)
    assert np.array_equal(cos, ref)
    with pytest.raises(ValueError, match=r"rope_theta.*differs from base = 10000\.0"):
        rotary_cos_sin(np.arange(4), 8, scaling=rope)


# ----------------------------------------------------------------------------- (g) backward


BACKWARD_CASES = [
    # (id, x shape, table lead dims, rotary_dim, interleaved, scaling)
    ("full, shared table", (B, H, T, DK), (), DK, False, None),
    ("full, interleaved", (B, H, T, DK), (), DK, True, None),
    ("partial, per-batch table", (B, H, T, DK), (B, 1), 6, False, None),
    ("partial, interleaved, per-batch", (B, H, T, DK), (B, 1), 6, True, None),
    (
        "yarn-scaled table (m != 1)",
        (B, HKV, S, DK),
        (B, 1),
        4,
        True,
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    ),
]


@pytest.mark.parametrize(
    ("shape", "lead", "rotary_dim", "interleaved", "scaling"),
    [c[1:] for c in BACKWARD_CASES],
    ids=[c[0] for c in BACKWARD_CASES],
)
def test_backward_by_finite_differences(rng, shape, lead, rotary_dim, interleaved, scaling):
    x = rng.normal(size=shape)
    cos, sin = tables(rng, lead, shape[-2], rotary_dim, scaling)
    dout = rng.normal(size=shape)  # random cotangent

    def f(x):
        return apply_rotary(x, cos, sin, interleaved=interleaved)

    dx = apply_rotary_backward(dout, cos, sin, interleaved=interleaved)
    result = check_vjp(f, {"x": x}, dout, {"x": dx})
    assert result.passed, str(result)
    # wrong backwards fail the same check: the forward rotation, and the identity
    wrong = check_vjp(f, {"x": x}, dout, {"x": apply_rotary(dout, cos, sin, interleaved)})
    assert not wrong.passed
    assert not check_vjp(f, {"x": x}, dout, {"x": dout}).passed


def test_backward_is_the_transpose_not_the_inverse(rng):
    x = rng.normal(size=(B, H, T, DK))
    cos, sin = tables(rng, (), T, 6)
    assert rel_err(apply_rotary_backward(apply_rotary(x, cos, sin), cos, sin), x) < RTOL
    yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}
    m = 0.1 * math.log(8.0) + 1.0
    cos, sin = tables(rng, (), T, 6, scaling=yarn)
    back = apply_rotary_backward(apply_rotary(x, cos, sin), cos, sin)
    assert rel_err(back[..., :6], m**2 * x[..., :6]) < RTOL  # R^T R = m^2 I on the pairs
    assert np.array_equal(back[..., 6:], x[..., 6:])


@pytest.mark.parametrize("interleaved", [False, True])
def test_table_gradients_of_the_derivation_page(rng, interleaved):
    """dcos = sum(dy_a x_a + dy_b x_b), dsin = sum(dy_b x_a - dy_a x_b) over the broadcast axes:
    the formulas of docs/derivations/rotary.md, which the library does not compute."""
    x = rng.normal(size=(B, H, T, DK))
    cos, sin = tables(rng, (), T, 6)
    dout = rng.normal(size=x.shape)
    sl = (slice(0, 6, 2), slice(1, 6, 2)) if interleaved else (slice(0, 3), slice(3, 6))
    xa, xb, da, db = x[..., sl[0]], x[..., sl[1]], dout[..., sl[0]], dout[..., sl[1]]
    dcos = (da * xa + db * xb).sum(axis=(0, 1))  # (T, 3)
    dsin = (db * xa - da * xb).sum(axis=(0, 1))
    result = check_vjp(
        lambda cos, sin: apply_rotary(x, cos, sin, interleaved=interleaved),
        {"cos": cos, "sin": sin},
        dout,
        {"cos": dcos, "sin": dsin},
    )
    assert result.passed, str(result)


def test_backward_through_attention_with_gqa(rng):
    """RoPE on q and k, then attention (GQA, T != S, Dk != Dv, per-sequence offsets, causal
    bottom-right): the chain rule through apply_rotary_backward, by finite differences."""
    q, k, v = (
        rng.normal(size=(B, H, T, DK)),
        rng.normal(size=(B, HKV, S, DK)),
        rng.normal(size=(B, HKV, S, DV)),
    )
    pos_k = np.array([3, 20])[:, None] + np.arange(S)  # (B, S)
    cq, sq = rotary_cos_sin(pos_k[:, S - T :], 6)  # (B, T, 3)
    ck, sk = rotary_cos_sin(pos_k, 6)  # (B, S, 3)
    cq, sq, ck, sk = cq[:, None], sq[:, None], ck[:, None], sk[:, None]
    opts = {"causal": True, "align": "bottom_right"}

    def f(q, k, v):
        return scaled_dot_product_attention(
            apply_rotary(q, cq, sq, interleaved=True),
            apply_rotary(k, ck, sk, interleaved=True),
            v,
            **opts,
        )

    dout = rng.normal(size=(B, H, T, DV))
    qr, kr = apply_rotary(q, cq, sq, interleaved=True), apply_rotary(k, ck, sk, interleaved=True)
    g = scaled_dot_product_attention_backward(dout, qr, kr, v, **opts)
    dq = apply_rotary_backward(g.dq, cq, sq, interleaved=True)
    dk = apply_rotary_backward(g.dk, ck, sk, interleaved=True)
    result = check_vjp(f, {"q": q, "k": k, "v": v}, dout, {"q": dq, "k": dk, "v": g.dv})
    assert result.passed, str(result)
    # forgetting the rotary backward (passing the rotated-space gradients through) fails
    wrong = check_vjp(f, {"q": q, "k": k, "v": v}, dout, {"q": g.dq, "k": g.dk, "v": g.dv})
    assert not wrong.passed


# ----------------------------------------------------------------------------- (h) bad inputs


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rotary_dim": 5}, ValueError, r"rotary_dim must be an even int >= 2.*got 5"),
        ({"rotary_dim": 0}, ValueError, r"rotary_dim must be an even int >= 2.*got 0"),
        ({"rotary_dim": 4.0}, TypeError, r"rotary_dim must be an even int"),
        ({"rotary_dim": True}, TypeError, r"rotary_dim must be an even int"),
        ({"base": 1.0}, ValueError, r"base must be > 1"),
        ({"base": "big"}, TypeError, r"base must be a real number"),
        ({"positions": [0.0, np.nan]}, ValueError, r"positions must be finite; got nan"),
        ({"positions": ["a"]}, TypeError, r"positions must hold real numbers"),
        ({"positions": [1j]}, TypeError, r"positions is complex"),
        ({"scaling": "linear"}, TypeError, r"scaling must be None or a dict.*got str"),
        ({"scaling": {"rope_type": "ntk"}}, ValueError, r"must be one of \('default', 'linear'"),
        ({"scaling": {"rope_type": ["yarn"]}}, ValueError, r"must be one of"),
        (
            {"scaling": {"rope_type": "dynamic", "factor": 2.0}},
            ValueError,
            r"'dynamic' is not supported: .*seq_len",
        ),
        ({"scaling": {"rope_type": "longrope"}}, ValueError, r"'longrope' is not supported"),
        (
            {"scaling": {"rope_type": "linear", "type": "yarn", "factor": 2.0}},
            ValueError,
            r"they must agree",
        ),
        (
            {"scaling": {"rope_type": "linear"}},
            ValueError,
            r"missing the required key\(s\) \['factor'\]",
        ),
        (
            {
                "scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            ValueError,
            r"rope_type='llama3' is missing the required key\(s\) \['low_freq_factor'\]",
        ),
        (
            {"scaling": {"rope_type": "yarn", "factor": 4.0}},
            ValueError,
            r"missing the required key\(s\) \['original_max_position_embeddings'\]",
        ),
        (
            {"scaling": {"rope_type": "linear", "factor": 2.0, "facter": 3.0}},
            ValueError,
            r"unrecognised key\(s\) \['facter'\]",
        ),
        (
            {"scaling": {"rope_type": "linear", "factor": -2.0}},
            ValueError,
            r"scaling\['factor'\] must be > 0; got -2\.0",
        ),
        (
            {"scaling": {"rope_type": "linear", "factor": None}},
            TypeError,
            r"scaling\['factor'\] must be a real number; got None",
        ),
        (
            {
                "scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            ValueError,
            r"high_freq_factor'\] must be > .*low_freq_factor",
        ),
        (
            {
                "scaling": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "truncate": "yes",
                }
            },
            TypeError,
            r"scaling\['truncate'\] must be a bool",
        ),
    ],
)
def test_rotary_cos_sin_rejects_bad_inputs(kwargs, exc, match):
    args = {"positions": np.arange(3), "rotary_dim": 8, **kwargs}
    with pytest.raises(exc, match=match):
        rotary_cos_sin(**args)


@pytest.mark.parametrize("fn", [apply_rotary, apply_rotary_backward])
def test_apply_rotary_rejects_bad_inputs(rng, fn):
    name = "x" if fn is apply_rotary else "dout"
    x = rng.normal(size=(B, H, T, 8))
    cos, sin = rotary_cos_sin(np.arange(T), 8)  # (T, 4)
    big_cos, big_sin = rotary_cos_sin(np.arange(T), 10)  # rotary_dim 10 > 8
    with pytest.raises(ValueError, match=rf"rotary_dim = 2 \* cos.shape\[-1\] = 10 exceeds {name}"):
        fn(x, big_cos, big_sin)
    with pytest.raises(ValueError, match=r"cos and sin must have one shape; got \(3, 4\) and"):
        fn(x, cos, sin[:, :2])
    with pytest.raises(ValueError, match=r"cos must be broadcastable to .* = \(2, 4, 3, 4\)"):
        fn(x, cos[:2], sin[:2])  # tables for 2 positions, x has 3
    with pytest.raises(ValueError, match=r"cos must be broadcastable"):  # would enlarge x
        fn(x[0], np.broadcast_to(cos, (B, 1, T, 4)), np.broadcast_to(sin, (B, 1, T, 4)))
    with pytest.raises(ValueError, match=r"rotary_dim // 2 >= 1"):
        fn(x, cos[:, :0], sin[:, :0])
    with pytest.raises(ValueError, match=r"cos must have shape"):
        fn(x, 1.0, 0.0)
    with pytest.raises(ValueError, match=rf"{name} must have shape"):
        fn(1.0, cos, sin)
    with pytest.raises(TypeError, match=r"interleaved must be a bool.*got 'yes'"):
        fn(x, cos, sin, interleaved="yes")
    with pytest.raises(TypeError, match=r"cos must hold real numbers"):
        fn(x, np.array([["a"] * 4] * T), sin)


# ----------------------------------------------------------------------------- (i) no mutation


def test_inputs_are_not_mutated_and_outputs_are_fresh(rng):
    x = rng.normal(size=(B, H, T, DK))
    positions = rng.integers(0, 9, size=(B, T))
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    copies = (x.copy(), positions.copy(), dict(scaling))
    cos, sin = rotary_cos_sin(positions, 6, scaling=scaling)
    cos, sin = cos[:, None], sin[:, None]
    table_copies = (cos.copy(), sin.copy())
    for interleaved in (False, True):
        out = apply_rotary(x, cos, sin, interleaved=interleaved)
        dx = apply_rotary_backward(x, cos, sin, interleaved=interleaved)
        for arr in (out, dx):
            assert not np.shares_memory(arr, x)
            assert not np.shares_memory(arr, cos) and not np.shares_memory(arr, sin)
    assert np.array_equal(x, copies[0]) and np.array_equal(positions, copies[1])
    assert scaling == copies[2]
    assert np.array_equal(cos, table_copies[0]) and np.array_equal(sin, table_copies[1])


def test_computes_in_float64(rng):
    x = rng.normal(size=(T, DK)).astype(np.float32)
    cos, sin = rotary_cos_sin(np.arange(T, dtype=np.int32), DK)
    assert cos.dtype == np.float64
    out = apply_rotary(x, cos.astype(np.float32), sin.astype(np.float32))
    assert out.dtype == np.float64
    assert apply_rotary_backward(x, cos, sin).dtype == np.float64
    assert rotary_cos_sin(3, 4)[0].shape == (2,)  # a scalar position
