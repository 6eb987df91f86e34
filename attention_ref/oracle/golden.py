r"""Golden test vectors: a directory of cases for implementations outside Python.

:func:`write_golden` evaluates canonical cases (:mod:`attention_ref.cases`) and writes, per case,
one ``<case name>.npz`` -- inputs, array options, the cotangent, the output, every gradient and
the intermediates (scores, masked scores, row max, logsumexp, weights) -- and one
``manifest.json``: the format name and version, the conventions, and per case its dimensions,
scalar options and, per array, its shape, dtype and the SHA-256 of its bytes. A C, Rust or
JavaScript test reads the manifest with any JSON parser and the arrays with a zip reader and the
ten-line ``.npy`` header (``docs/golden.md`` describes both byte by byte).

:func:`read_golden` reads such a directory back and verifies every checksum, shape and dtype
against the manifest, raising :class:`GoldenError` -- naming the file, the array and what is
wrong -- on any corruption. :func:`verify_golden` judges an implementation: a directory of its
outputs laid out the same way, or a Python callable; with no candidate it recomputes the
reference from the stored inputs and checks the stored outputs (a golden set made by another,
or a broken, version fails).

Command line: ``attention-ref golden DIR`` and ``attention-ref verify DIR [--candidate DIR2]``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .._version import __version__
from ..core.attention import scaled_dot_product_attention
from ..core.mha import multi_head_attention
from ..core.options import AttentionOptions
from ..core.scores import masked_fill_value
from ._golden_v1 import CONVENTIONS_V1, KEY_GROUPS_V1
from .cases import (
    ALL_KINDS,
    DIFFERENTIABLE_KINDS,
    Case,
    CaseData,
    Reference,
    get_case,
    serving_cases,
)
from .cases import cases as canonical_cases
from .compare import DEFAULT_TOLERANCES, PRECISIONS, Comparison, assert_close, compare
from .tables import Column, json_float, render_table
from .testing import budget_reports

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "CONVENTIONS",
    "GoldenError",
    "Problem",
    "ArraySpec",
    "GoldenCase",
    "GoldenSet",
    "ArrayResult",
    "write_golden",
    "read_golden",
    "verify_golden",
    "format_results",
]

#: The ``format`` field of every manifest.
FORMAT = "attention_ref.golden"
#: The version this module writes. A change a reader could misread (a renamed key, a new dtype,
#: another array encoding) increments it; adding cases or arrays under the same rules does not.
FORMAT_VERSION = 2
#: The versions :func:`read_golden` understands. Version 2 added the serving kinds (paged,
#: kvcache, mla, sparse) and the integer dtype ``<i8`` for their index arrays; a version-1 set
#: reads unchanged.
SUPPORTED_VERSIONS = (1, 2)
#: The manifest's file name inside a golden directory.
MANIFEST_NAME = "manifest.json"
#: The JSON Schema (draft 2020-12) of a format-2 manifest, shipped with the package, for readers
#: in other languages; ``docs/golden.md`` describes each field.
MANIFEST_SCHEMA = Path(__file__).with_name("golden_manifest.schema.json")

#: Key groups, in the order the arrays are stored.
_GROUPS = ("input", "option", "cotangent", "output", "grad", "intermediate")
#: ``group.name`` (letters, digits, ``_``), or ``cotangent``: safe as a zip entry and a file name
#: on every system, and the same spelling in every language.
_KEY = re.compile(r"(?:(?:input|option|output|grad|intermediate)\.[A-Za-z][A-Za-z0-9_]*|cotangent)")
#: Case names become file names: no separators, no leading dot.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: The two array encodings (``.npy`` descr strings): little-endian IEEE 754 binary64, and one
#: byte per boolean (0 or 1).
_DTYPES = {"<f8": np.dtype("<f8"), "|b1": np.dtype("|b1"), "<i8": np.dtype("<i8")}
#: Fixed zip timestamps and permissions: the same arrays always give the same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_ZIP_ATTR = 0o100644 << 16
_FUNCTIONS: dict[str, str] = {  # kind -> the reference function, as the manifest names it
    "sdpa": scaled_dot_product_attention.__name__,
    "mha": multi_head_attention.__name__,
    "paged": "paged_attention",
    "kvcache": "attention_with_kvcache",
    "mla": "mla_attention_naive",
    "sparse": "sparse_attention",
}
#: Keyword arguments of the reference that are arrays: stored as ``option.<name>``; ``bias`` is
#: differentiable, so it is an input.
_ARRAY_OPTIONS = ("mask", "dropout_mask")
#: Not recorded in a format-1 manifest: ``chunk_size``, ``sink_tokens`` and ``sinks`` came after
#: it and no canonical case uses them (a candidate callable is passed exactly the recorded options).
#: ``score_mod`` and ``mask_mod`` are functions: a file cannot hold them.
_NOT_OPTIONS = (
    "score_mod",
    "mask_mod",
    "dtype",
    "rounding",
    "bias",
    "sinks",
    "key_padding_mask",
    "chunk_size",
    "sink_tokens",
    "params",
) + _ARRAY_OPTIONS


def _scalar_defaults(kind: str) -> dict[str, Any]:
    """The scalar keyword options of the reference function of ``kind``, with their defaults."""
    heads = {"num_heads": None, "num_kv_heads": None} if kind == "mha" else {}
    if kind == "kvcache":
        heads = {"rotary_interleaved": False}
    defaults = {n: d for n, d in AttentionOptions.defaults().items() if n not in _NOT_OPTIONS}
    if kind in ("paged", "kvcache"):  # the queries are the last positions: always bottom_right
        defaults["align"] = "bottom_right"
    return {**heads, **defaults}


#: What a golden set assumes, written into every manifest (``conventions``) so that a reader in
#: another language has the definitions next to the numbers. ``docs/conventions.md`` has the
#: sources and what each framework does.
CONVENTIONS: dict[str, Any] = {
    "dimension_letters": {
        "B": "batch",
        "T": "query positions",
        "S": "key/value positions",
        "D": "model width of the query input",
        "H": "query heads",
        "Hkv": "key/value heads (H is a multiple of Hkv)",
        "Dk": "per-head query/key width",
        "Dv": "per-head value width",
        "Dk_in": "key input width (MHA)",
        "Dv_in": "value input width (MHA)",
        "D_out": "output width (MHA)",
    },
    "layout": {
        "sdpa": "q (B, H, T, Dk), k (B, Hkv, S, Dk), v (B, Hkv, S, Dv), out (B, H, T, Dv); C order "
        "(row-major, the last axis varies fastest)",
        "mha": "query (B, T, D), key (B, S, Dk_in), value (B, S, Dv_in), out (B, T, D_out); "
        "per-head intermediates (B, H, T, Dk) and (B, Hkv, S, Dk) like sdpa",
        "paged": "q (B, H, T, Dk); k_pages (num_blocks, page_size, Hkv, Dk), v_pages "
        "(num_blocks, page_size, Hkv, Dv); option.block_table (B, max_blocks): position p of "
        "sequence b is slot p % page_size of page block_table[b, p // page_size]; "
        "option.seqlens (B,); the T queries are the last T positions of each sequence "
        "(bottom_right)",
        "kvcache": "FlashAttention's flash_attn_with_kvcache layouts: q (B, T, H, Dk), k_cache "
        "(B, S, Hkv, Dk), k (B, T, Hkv, Dk) appended at option.cache_seqlens after rotary "
        "(option.rotary_cos/sin (S, rotary_dim / 2)); out (B, T, H, Dv); no gradients",
        "mla": "q_nope (B, H, T, d_nope), q_pe (B, H, T, d_rope), c_kv (B, S, d_c), k_pe "
        "(B, S, d_rope), w_uk (H, d_c, d_nope), w_uv (H, d_c, Dv); k_h = [c_kv @ w_uk[h], k_pe], "
        "v_h = c_kv @ w_uv[h]; scale 1 / sqrt(d_nope + d_rope) unless given",
        "sparse": "q, k, v as sdpa; option.indices (B, Hkv, T, topk) key positions, -1 unused: "
        "each row attends only the keys listed",
    },
    "scale": "scores are multiplied by scale; scale null means 1 / sqrt(Dk); scale_used is the "
    "value applied",
    "order_of_operations": [
        "scores = q @ k^T * scale",
        "softcap (if not null): scores = softcap * tanh(scores / softcap)",
        "+ bias (additive, broadcast to (B, H, T, S); a -inf entry masks its pair)",
        "mask: the boolean mask AND causal AND window; masked entries are excluded from the "
        "softmax",
        "probs = softmax over S of the allowed entries; empty rows follow empty_rows",
        "dropout (dropout_p > 0): probs * option.dropout_mask / (1 - dropout_p)",
        "out = (dropped) probs @ v",
    ],
    "mask": "bool, broadcastable to (B, H, T, S); true = may attend (PyTorch "
    "scaled_dot_product_attention, JAX)",
    "causal": {
        "top_left": "query i may attend key j when j <= i (PyTorch is_causal, JAX)",
        "bottom_right": "query i may attend key j when j <= i + S - T (FlashAttention, decoding)",
    },
    "window": "window [left, right]: query i may attend key j when i' - left <= j <= i' + right, "
    "with i' = i (align top_left) or i + S - T (align bottom_right); a null side is unbounded; "
    "combined with causal by AND",
    "empty_rows": {
        "zero": "a query row with no key to attend gives weights 0 and output 0, and passes no "
        "gradient",
        "uniform": "such a row gives weights 1/S over all keys (output = mean of v)",
        "nan": "such a row gives NaN",
        "raise": "such a row is an error",
    },
    "gqa": "query head h uses key/value head h // (H // Hkv); key/value gradients sum over the "
    "heads of each group",
    "dropout": "deterministic: option.dropout_mask is the keep-mask (true = kept), kept weights "
    "are scaled by 1 / (1 - dropout_p); intermediate.probs are the weights before dropout",
    "weights": "y = x @ w + b with w of shape (in, out) (PyTorch nn.Linear stores (out, in): "
    "transpose it)",
    "mha": [
        "q = split_heads(query @ w_q + b_q, H), k = split_heads(key @ w_k + b_k, Hkv), "
        "v = split_heads(value @ w_v + b_v, Hkv)",
        "split_heads: (B, T, H*Dh) -> (B, H, T, Dh) with out[b, h, t, d] = x[b, t, h*Dh + d]",
        "context = sdpa(q, k, v, options); out = merge_heads(context) @ w_o + b_o, merge_heads "
        "the inverse of split_heads",
        "a case without b_q, b_k, b_v, b_o has no projection biases",
    ],
    "gradients": "grad.X is the vector-Jacobian product sum(cotangent * d output.out / "
    "d input.X), of input.X's shape; an input broadcast in the forward (a bias of shape "
    "(1, H, T, S)) has its gradient summed over the broadcast axes",
    "intermediates": {
        "scores": "(B, H, T, S) q @ k^T * scale, before softcap, bias and mask",
        "masked_scores": "(B, H, T, S) after softcap, bias and mask; masked entries hold "
        "masked_fill, not -inf",
        "row_max": "(B, H, T) max of masked_scores over the allowed keys; -inf for an empty row",
        "logsumexp": "(B, H, T) log of sum of exp(masked_scores) over the allowed keys; -inf for "
        "an empty row",
        "probs": "(B, H, T, S) attention weights after the empty-row policy, before dropout",
        "q": "MHA: (B, H, T, Dk) per-head queries",
        "k": "MHA: (B, Hkv, S, Dk) per-head keys",
        "v": "MHA: (B, Hkv, S, Dv) per-head values",
        "context": "MHA: (B, H, T, Dv) per-head attention output",
    },
    "masked_fill": float(masked_fill_value(np.float64)),
    "arrays": "little-endian; dtype <f8 = IEEE 754 binary64, |b1 = one byte per element, 0 or 1, "
    "<i8 = int64 (index arrays); "
    "sha256 = SHA-256 of the array's raw data bytes in C order (the .npy payload after its header)",
}

_GROUP_DOC = {
    "input": "the differentiable arguments (sdpa: q, k, v, bias; mha: query, key, value, w_q ... "
    "b_o, bias)",
    "option": "array-valued options: mask (bool), dropout_mask (bool); serving kinds: "
    "block_table, seqlens, cache_seqlens, indices (int64), rotary_cos, rotary_sin (float64)",
    "cotangent": "the random upstream gradient of output.out (same shape)",
    "output": "output.out, the reference output",
    "grad": "grad.X, the gradient of input.X for the cotangent",
    "intermediate": "forward intermediates by name (see conventions.intermediates)",
}


# ----------------------------------------------------------------------------- errors


class Problem(NamedTuple):
    """One thing wrong with a golden directory."""

    file: str  #: the file, relative to the directory (``manifest.json``, ``plain.npz``)
    array: str | None  #: the array's key (``grad.q``), or None for the file as a whole
    what: str  #: what is wrong

    def __str__(self) -> str:
        return f"{self.file}: " + (f"array {self.array!r}: " if self.array else "") + self.what


class GoldenError(ValueError):
    """A golden directory that cannot be trusted: corrupt, incomplete, or not this format.

    ``problems`` lists every :class:`Problem` found (file, array, what); the message shows them
    all, one per line.
    """

    def __init__(self, directory: str | os.PathLike[str], problems: Sequence[Problem]):
        self.directory = str(directory)
        self.problems = list(problems)
        head = f"golden set {self.directory} is not valid"
        if len(self.problems) == 1:
            text = f"{head}: {self.problems[0]}"
        else:
            text = f"{head} ({len(self.problems)} problems):\n" + "\n".join(
                f"  {p}" for p in self.problems
            )
        super().__init__(text)


# ----------------------------------------------------------------------------- writing


def _select(cases: Iterable[Case | str] | None) -> list[Case]:
    if cases is None:
        return canonical_cases() + serving_cases()
    if isinstance(cases, (str, Case)):
        raise TypeError(
            f"cases must be None or a list of case names or Case objects; got {cases!r}"
        )
    selected: list[Case] = []
    for c in cases:
        if isinstance(c, str):
            c = get_case(c)  # ValueError listing the names
        elif not isinstance(c, Case):
            raise TypeError(
                f"cases must hold case names or Case objects; got {type(c).__name__} {c!r}"
            )
        if c.kind not in ALL_KINDS or not _NAME.fullmatch(c.name):
            raise ValueError(
                f"case name must match {_NAME.pattern} and kind be one of {ALL_KINDS}; got "
                f"{c.name!r}, "
                f"{c.kind!r}"
            )
        if any(s.name == c.name for s in selected):
            raise ValueError(f"cases must not repeat a name; {c.name!r} appears twice")
        selected.append(c)
    if not selected:
        raise ValueError("cases must name at least one case; got an empty list")
    return selected


def _case_arrays(data: CaseData, ref: Reference) -> dict[str, np.ndarray]:
    """Every array of a case by key, in storage order, as little-endian C-order float64 / bool."""
    arrays: dict[str, Any] = {f"input.{n}": a for n, a in data.inputs.items()}
    arrays.update({f"option.{n}": a for n, a in data.options.items() if isinstance(a, np.ndarray)})
    if data.cotangent is not None:  # the kvcache kind is inference only
        arrays["cotangent"] = data.cotangent
    arrays["output.out"] = ref.out
    arrays.update({f"grad.{n}": g for n, g in ref.grads.items()})
    arrays.update({f"intermediate.{n}": a for n, a in ref.intermediates.items()})
    out = {}
    for key, a in arrays.items():
        a = np.asarray(a)
        kind = "|b1" if a.dtype == np.bool_ else "<i8" if a.dtype.kind in "iu" else "<f8"
        out[key] = np.ascontiguousarray(a, dtype=_DTYPES[kind])  # no copy when already so
    return out


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A zip of stored (uncompressed) ``<key>.npy`` entries with fixed metadata.

    Not :func:`numpy.savez`: it writes every local header with a ZIP64 extra field and the
    current time, so the bytes change between runs and a minimal reader must parse ZIP64. These
    archives have exact 32-bit sizes in every header and no data descriptors, and
    :func:`numpy.load` reads them like any ``.npz``.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, a in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # unix, so that the attributes below mean the same everywhere
            info.external_attr = _ZIP_ATTR
            zf.writestr(info, _npy_bytes(a))
    return buf.getvalue()


def _nonfinite(a: np.ndarray) -> dict[str, int]:
    if a.dtype.kind != "f":
        return {"neg_inf": 0, "pos_inf": 0, "nan": 0}
    return {
        "neg_inf": int(np.isneginf(a).sum()),
        "pos_inf": int(np.isposinf(a).sum()),
        "nan": int(np.isnan(a).sum()),
    }


def _array_entry(key: str, a: np.ndarray) -> dict[str, Any]:
    return {
        "key": key,
        "shape": list(a.shape),
        "dtype": a.dtype.str,
        "sha256": hashlib.sha256(a.tobytes(order="C")).hexdigest(),
        "nonfinite": _nonfinite(a),
    }


def _json_option(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, (tuple, list)):
        return [_json_option(x) for x in v]
    if v is None or isinstance(v, str):
        return v
    raise TypeError(f"option value {v!r} of type {type(v).__name__} has no JSON form")


def _case_entry(
    data: CaseData, file: str, blob: bytes, arrays: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    case = data.case
    scalars = {
        **_scalar_defaults(case.kind),
        **{n: v for n, v in data.options.items() if not isinstance(v, np.ndarray)},
    }
    return {
        "name": case.name,
        "kind": case.kind,
        "function": _FUNCTIONS[case.kind],
        "description": case.description,
        "tags": list(case.tags),
        "dims": dict(case.dims),
        "options": {n: _json_option(v) for n, v in scalars.items()},
        "scale_used": data.scale_used(),
        "file": file,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        "arrays": [_array_entry(k, a) for k, a in arrays.items()],
    }


def _dump_manifest(manifest: Mapping[str, Any]) -> str:
    """Indented ASCII JSON with each array entry on one line.

    ``allow_nan=False``: a NaN or infinity would make the manifest invalid JSON. None can occur
    (the options are validated finite, the arrays' infinities are only counted), and this makes
    sure of it.
    """
    compact: dict[str, str] = {}

    def mark(entry: Mapping[str, Any]) -> str:
        token = f"@@array-{len(compact)}@@"
        compact[f'"{token}"'] = json.dumps(entry, allow_nan=False)
        return token

    marked = {
        **manifest,
        "cases": [{**c, "arrays": [mark(a) for a in c["arrays"]]} for c in manifest["cases"]],
    }
    text = json.dumps(marked, indent=1, allow_nan=False)
    text = re.sub(r'"@@array-\d+@@"', lambda m: compact[m.group(0)], text)
    return text + "\n"


# The writer's filesystem steps. A golden set is replaced as a whole: the new set is written,
# every file fsynced, into a fresh staging directory beside the target, the files of the target
# that the old manifest does not list (the user's) are hard-linked into it, and the two
# directories are exchanged in one atomic rename (Linux renameat2 RENAME_EXCHANGE). A kill at any
# step leaves the target holding the complete old set or the complete new set; leftover staging
# directories are removed by the next write. docs/golden.md, "How a set is written".

#: Staging directories are named ``.<target name><_STAGING><pid>-<random>`` beside the target.
_STAGING = ".attention_ref-golden-"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _fs_step(what: str) -> None:
    """Called before every filesystem step of :func:`write_golden` (a test kills the writer here,
    step by step, to prove the guarantee above)."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically; False when the system cannot (then nothing happened)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, blob: bytes) -> None:
    """Create ``path`` (never an existing file, never through a link), write it whole, fsync."""
    _fs_step(f"create {path.name}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags | getattr(os, "O_BINARY", 0), 0o644)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view) :]
        _fs_step(f"fsync {path.name}")
        os.fsync(fd)
    finally:
        os.close(fd)


def _staging_dirs(path: Path) -> list[tuple[Path, int]]:
    """Staging directories of writers of ``path``, with the pid in their name."""
    prefix = f".{path.name}{_STAGING}"
    found = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for e in entries:
        if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False):
            pid = e.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit():
                found.append((Path(e.path), int(pid)))
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(path: Path) -> None:
    """Remove the staging directories a killed writer left beside ``path``.

    Each holds either a new set not yet swapped in, or the old set swapped out (with extra links
    to the user's files, which are in ``path`` too): deleting it loses nothing. One that was
    swapped out while ``path`` is missing (the two-rename fallback, killed between its renames) is
    moved back first.
    """
    import shutil

    for staged, pid in _staging_dirs(path):
        if _alive(pid):
            continue
        if not os.path.lexists(path) and staged.name.endswith("-old"):
            _fs_step(f"restore {path.name}")
            os.rename(staged, path)
            continue
        _fs_step(f"remove {staged.name}")
        shutil.rmtree(staged)


def _plan(path: Path, overwrite: bool, new_names: set[str]) -> list[str]:
    """Check ``path`` before anything is written; return the names of the user's files to keep.

    Refuses (``FileExistsError``), touching nothing: a non-empty directory without
    ``overwrite``; a ``manifest.json`` that is not a regular file of this format; any symbolic
    link or subdirectory in it; a user file with the name of a file of the new set.
    """
    if not path.exists():
        return []
    entries = sorted(os.scandir(path), key=lambda e: e.name)
    if not entries:
        return []
    names = [e.name for e in entries]
    if not overwrite:
        raise FileExistsError(
            f"directory {path} is not empty ({len(names)} entries: {', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}); pass overwrite=True (CLI: --overwrite) "
            "to replace the golden set in it"
        )
    for e in entries:
        if e.is_symlink():
            raise FileExistsError(
                f"directory {path} holds a symbolic link, {e.name!r}; the golden writer never "
                "follows or replaces links: remove it, or use another directory"
            )
        if e.is_dir(follow_symlinks=False):
            raise FileExistsError(
                f"directory {path} holds a subdirectory, {e.name!r}; the golden writer keeps "
                "the files that are not part of the set, but cannot carry a directory over: "
                "move it out, or use another directory"
            )
        if not e.is_file(follow_symlinks=False):
            raise FileExistsError(f"directory {path} holds {e.name!r}, which is not a file")
    listed: set[str] = set()
    if MANIFEST_NAME in names:
        old = _old_manifest(path / MANIFEST_NAME)
        if old is None:
            raise FileExistsError(
                f"{path / MANIFEST_NAME} is not an {FORMAT} manifest (another tool's file?); "
                "overwrite=True replaces only a golden set: move it, or use another directory"
            )
        listed = {MANIFEST_NAME} | old
    keep = [n for n in names if n not in listed]
    stray = [n for n in keep if n.endswith(".npz")]
    if stray:
        why = (
            "no manifest.json lists it: not a golden set, so overwrite=True will not touch it"
            if not listed
            else "the old manifest does not list it"
        )
        raise FileExistsError(
            f"directory {path} holds {stray[0]!r}, and {why}; the new set would leave it as a "
            "stray .npz that read_golden reports: move it, or use another directory"
        )
    clash = sorted(set(keep) & new_names)
    if clash:
        raise FileExistsError(
            f"directory {path} holds {clash[0]!r}, which the old manifest does not list and the "
            "new set would replace: move it, or use another directory"
        )
    return keep


def _old_manifest(mpath: Path) -> set[str] | None:
    """The files an existing manifest lists, or None if it is not one of this format."""
    try:
        if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
            return None
        doc = json.loads(mpath.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    files = set()
    for c in doc.get("cases") or []:
        f = c.get("file") if isinstance(c, dict) else None
        if isinstance(f, str) and _NAME.fullmatch(f):
            files.add(f)
    return files


#: A manifest larger than this is not read (a golden manifest of 1,000 cases is ~2 MiB).
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024

#: The conventions and key-group texts each format version's manifests carry, exactly.
_EXPECTED_TEXTS: dict[int, tuple[Any, Any]] = {
    1: (CONVENTIONS_V1, KEY_GROUPS_V1),
    2: (json.loads(json.dumps(CONVENTIONS)), json.loads(json.dumps(_GROUP_DOC))),
}


def _replace_set(path: Path, files: Mapping[str, bytes], overwrite: bool) -> None:
    """Put exactly ``files`` (the manifest last among them) at ``path``, atomically."""
    import shutil
    import tempfile

    if path.is_symlink():
        raise FileExistsError(f"directory must not be a symbolic link; {path} is one")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"directory must be a directory; {path} is a file")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FileExistsError(f"cannot create {path}: {ancestor} is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)  # first: it may move back a set a killed writer left aside
    keep = _plan(path, overwrite, set(files))
    _fs_step("create the staging directory")
    staging = Path(
        tempfile.mkdtemp(prefix=f".{path.name}{_STAGING}{os.getpid()}-", dir=path.parent)
    )
    swapped = False
    try:
        for name, blob in files.items():
            _write_new(staging / name, blob)
        for name in keep:  # the user's files: the same inodes, under the new directory too
            _fs_step(f"link {name}")
            try:
                os.link(path / name, staging / name, follow_symlinks=False)
            except OSError:  # no hard links on this filesystem: a copy, fsynced
                _write_new(staging / name, (path / name).read_bytes())
        _fs_step("fsync the staging directory")
        os.chmod(staging, 0o755 if not path.exists() else path.stat().st_mode & 0o7777)
        _fsync_dir(staging)
        if not path.exists():
            _fs_step(f"rename the staging directory to {path.name}")
            os.rename(staging, path)  # atomic: the set appears whole
            swapped = True
            _fs_step("fsync the parent directory")
            _fsync_dir(path.parent)
            return
        else:
            _fs_step(f"exchange the staging directory with {path.name}")
            if _exchange(staging, path):
                swapped = True
            else:  # two renames; a kill between them is undone by the next write (_clean_stale)
                aside = staging.with_name(staging.name + "-old")
                _fs_step(f"move {path.name} aside")
                os.rename(path, aside)
                _fs_step(f"rename the staging directory to {path.name}")
                os.rename(staging, path)
                staging, swapped = aside, True
        _fs_step("fsync the parent directory")
        _fsync_dir(path.parent)
        _fs_step("remove the old set")
        shutil.rmtree(staging)  # the old set (or nothing): the user's files live on in path
    except BaseException:
        if not swapped:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def write_golden(
    directory: str | os.PathLike[str],
    cases: Iterable[Case | str] | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    r"""Write golden test vectors for ``cases`` into ``directory``: one ``.npz`` per case and a
    manifest.

    Each case's file ``<name>.npz`` holds its arrays under the keys ``input.<name>``,
    ``option.<name>``, ``cotangent``, ``output.out``, ``grad.<name>`` and
    ``intermediate.<name>``, as uncompressed ``.npy`` (version 1.0) entries: little-endian
    float64 (``<f8``) or bool (``|b1``), C order. ``manifest.json`` records the format, the
    conventions and, per case, its dims, scalar options and every array's shape, dtype and
    SHA-256; it is written last. The same cases always give byte-identical files.
    The format: ``docs/golden.md``.

    Parameters
    ----------
    directory : str or path
        Created if missing. If it is not empty, ``overwrite=True`` is required.
    cases : list of str or Case, optional
        The cases to write (names or :class:`~attention_ref.cases.Case` objects); by default
        every canonical case, :func:`attention_ref.cases.cases`.
    overwrite : bool
        Replace the golden set in a non-empty directory. Exactly the files its old
        ``manifest.json`` lists (and the manifest) are replaced; every other file is kept. The
        replacement is atomic: the new set is written and fsynced in a staging directory beside
        ``directory``, then the two are exchanged in one rename, so a reader (or a kill) sees the
        complete old set or the complete new set, never a mixture. Refused, before anything is
        written: a ``manifest.json`` that is not of this format, a symbolic link or a
        subdirectory in ``directory``, a kept file that the new set would replace.
    progress : callable, optional
        Called with one line of text before each case, and before writing.

    Returns
    -------
    dict
        The manifest, as written to ``manifest.json``.

    Raises
    ------
    FileExistsError
        ``directory`` is a file or a symbolic link, or is not empty and ``overwrite`` is False,
        or holds what ``overwrite`` may not replace (see above).
    ValueError
        An unknown case name, a repeated case, or no case.

    Examples
    --------
    >>> import tempfile
    >>> from attention_ref.golden import read_golden, write_golden
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     manifest = write_golden(tmp, ["plain", "gqa"])
    ...     golden = read_golden(tmp)                    # every checksum verified
    ...     arrays = golden["gqa"].arrays()
    >>> manifest["format_version"], [c["file"] for c in manifest["cases"]]
    (2, ['plain.npz', 'gqa.npz'])
    >>> arrays["input.q"].shape, arrays["grad.v"].shape, arrays["intermediate.logsumexp"].shape
    ((2, 4, 3, 4), (2, 2, 5, 3), (2, 4, 3))
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or path; got {type(directory).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool; got {overwrite!r}")
    selected = _select(cases)
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"directory must be a directory; {path} is a file")
    say = progress or (lambda msg: None)
    if path.is_symlink():
        raise FileExistsError(f"directory must not be a symbolic link; {path} is one")
    # Everything is computed before the directory is touched: a case that fails to build leaves
    # the directory as it was.
    files: dict[str, bytes] = {}
    entries = []
    for i, case in enumerate(selected, start=1):
        say(f"computing {case.name} ({i}/{len(selected)})")
        data = case.build()
        arrays = _case_arrays(data, data.reference())
        file = f"{case.name}.npz"
        files[file] = _npz_bytes(arrays)
        entries.append(_case_entry(data, file, files[file], arrays))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "attention_ref_version": __version__,
        "conventions": CONVENTIONS,
        "key_groups": _GROUP_DOC,
        "cases": entries,
    }
    manifest["checksum"] = {"sha256": _manifest_checksum(manifest)}
    text = _dump_manifest(manifest)
    if MANIFEST_NAME in files:
        raise ValueError(f"a case may not be named like the manifest, {MANIFEST_NAME!r}")
    files[MANIFEST_NAME] = text.encode("ascii")  # last: written after every case file
    say(f"writing {len(files) - 1} files and {MANIFEST_NAME} to {path}")
    _replace_set(path, files, overwrite)
    return json.loads(text)


# ----------------------------------------------------------------------------- reading


class ArraySpec(NamedTuple):
    """One array as the manifest describes it."""

    key: str  #: ``group.name`` or ``cotangent``
    shape: tuple[int, ...]  #: the array's shape
    dtype: str  #: ``"<f8"`` or ``"|b1"``
    sha256: str  #: SHA-256 (hex) of the raw C-order data bytes
    nonfinite: dict[str, int]  #: counts of ``neg_inf``, ``pos_inf`` and ``nan`` entries


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (the format allows no NaN or Infinity literals)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"an object repeats the key(s) {repeated}")
    return dict(pairs)


def _parse_manifest(raw: bytes, problems: list[Problem]) -> dict[str, Any] | None:
    try:
        doc = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys
        )
    except UnicodeDecodeError as exc:
        problems.append(Problem(MANIFEST_NAME, None, f"malformed JSON: not UTF-8 text ({exc})"))
        return None
    except json.JSONDecodeError as exc:
        problems.append(
            Problem(
                MANIFEST_NAME,
                None,
                f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            )
        )
        return None
    except ValueError as exc:
        problems.append(Problem(MANIFEST_NAME, None, f"malformed JSON: {exc}"))
        return None
    except RecursionError:
        problems.append(Problem(MANIFEST_NAME, None, "malformed manifest: nested too deeply"))
        return None
    if not isinstance(doc, dict):
        problems.append(
            Problem(
                MANIFEST_NAME,
                None,
                f"malformed manifest: expected a JSON object, got {type(doc).__name__}",
            )
        )
        return None
    if doc.get("format") != FORMAT:
        problems.append(
            Problem(MANIFEST_NAME, None, f"format must be {FORMAT!r}; got {doc.get('format')!r}")
        )
        return None
    version = doc.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        problems.append(
            Problem(
                MANIFEST_NAME,
                None,
                f"unknown format_version {version!r}: this reader "
                f"(attention_ref {__version__}) supports {list(SUPPORTED_VERSIONS)}",
            )
        )
        return None
    if not isinstance(doc.get("cases"), list) or not doc["cases"]:
        problems.append(
            Problem(
                MANIFEST_NAME, None, f"cases must be a non-empty list; got {doc.get('cases')!r:.80}"
            )
        )
        return None
    conventions, groups = _EXPECTED_TEXTS[version]
    for field_name, want in (("conventions", conventions), ("key_groups", groups)):
        got = doc.get(field_name)
        if got != want:
            differs = (
                sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
                if isinstance(got, dict)
                else ["(not an object)"]
            )
            problems.append(
                Problem(
                    MANIFEST_NAME,
                    None,
                    f"{field_name} differ from format version {version}'s (at {differs[:3]}): "
                    "the definitions next to the numbers were edited",
                )
            )
    expected_keys = {"format", "format_version", "attention_ref_version", "conventions"}
    expected_keys |= {"key_groups", "cases"} | ({"checksum"} if version >= 2 else set())
    if set(doc) != expected_keys:
        problems.append(
            Problem(
                MANIFEST_NAME,
                None,
                f"the manifest's top-level keys must be {sorted(expected_keys)}; got {sorted(doc)}",
            )
        )
    return doc


def _manifest_checksum(doc: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest as written without its ``checksum`` field (format 2)."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(_dump_manifest(body).encode("ascii")).hexdigest()


def _check_checksum(doc: Mapping[str, Any], problems: list[Problem]) -> None:
    """Format 2: the manifest's ``checksum.sha256`` covers every other field."""
    if doc.get("format_version", 1) < 2:
        return
    stored = doc.get("checksum")
    if not (isinstance(stored, dict) and set(stored) == {"sha256"}):
        problems.append(
            Problem(MANIFEST_NAME, None, f"checksum must be {{'sha256': ...}}; got {stored!r:.80}")
        )
        return
    try:
        digest = _manifest_checksum(doc)
    except (TypeError, KeyError, ValueError, AttributeError):
        problems.append(Problem(MANIFEST_NAME, None, "checksum cannot be computed: malformed"))
        return
    if digest != stored["sha256"]:
        problems.append(
            Problem(
                MANIFEST_NAME,
                None,
                f"checksum: the manifest's fields hash to {digest}, its checksum says "
                f"{stored['sha256']!r:.80} (edited after it was written)",
            )
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _expected_shapes(kind: str, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Shapes the dims imply for the main arrays (a manifest whose dims were edited fails these)."""
    d = dims
    if kind in ("sdpa", "sparse"):
        return {
            "input.q": (d["B"], d["H"], d["T"], d["Dk"]),
            "input.k": (d["B"], d["Hkv"], d["S"], d["Dk"]),
            "input.v": (d["B"], d["Hkv"], d["S"], d["Dv"]),
            "output.out": (d["B"], d["H"], d["T"], d["Dv"]),
        }
    if kind == "paged":
        return {
            "input.q": (d["B"], d["H"], d["T"], d["Dk"]),
            "option.seqlens": (d["B"],),
            "output.out": (d["B"], d["H"], d["T"], d["Dv"]),
        }
    if kind == "kvcache":
        return {
            "input.q": (d["B"], d["T"], d["H"], d["Dk"]),
            "input.k": (d["B"], d["T"], d["Hkv"], d["Dk"]),
            "input.v": (d["B"], d["T"], d["Hkv"], d["Dv"]),
            "output.out": (d["B"], d["T"], d["H"], d["Dv"]),
        }
    if kind == "mla":
        return {
            "input.q_nope": (d["B"], d["H"], d["T"], d["d_nope"]),
            "input.q_pe": (d["B"], d["H"], d["T"], d["d_rope"]),
            "input.c_kv": (d["B"], d["S"], d["d_c"]),
            "input.k_pe": (d["B"], d["S"], d["d_rope"]),
            "input.w_uk": (d["H"], d["d_c"], d["d_nope"]),
            "input.w_uv": (d["H"], d["d_c"], d["Dv"]),
            "output.out": (d["B"], d["H"], d["T"], d["Dv"]),
        }
    return {
        "input.query": (d["B"], d["T"], d["D"]),
        "input.key": (d["B"], d["S"], d["Dk_in"]),
        "input.value": (d["B"], d["S"], d["Dv_in"]),
        "output.out": (d["B"], d["T"], d["D_out"]),
        "intermediate.q": (d["B"], d["H"], d["T"], d["Dk"]),
        "intermediate.context": (d["B"], d["H"], d["T"], d["Dv"]),
    }


_DIMS = {
    "sdpa": ("B", "H", "Hkv", "T", "S", "Dk", "Dv"),
    "mha": ("B", "H", "Hkv", "T", "S", "D", "Dk", "Dv", "Dk_in", "Dv_in", "D_out"),
    "paged": ("B", "H", "Hkv", "T", "S", "Dk", "Dv", "page_size"),
    "kvcache": ("B", "H", "Hkv", "T", "S", "Dk", "Dv", "rotary_dim"),
    "mla": ("B", "H", "T", "S", "d_nope", "d_rope", "d_c", "Dv"),
    "sparse": ("B", "H", "Hkv", "T", "S", "Dk", "Dv", "topk"),
}


def _option_problems(
    kind: str,
    dims: Mapping[str, int],
    options: Mapping[str, Any],
    scale_used: Any,
    version: int,
    array_options: Sequence[str] = (),
) -> list[str]:
    """What is wrong with a case's scalar options and ``scale_used``: the names must be exactly
    the reference function's, the values valid for the one options type, and ``scale_used`` what
    they and the dims give."""
    found: list[str] = []
    expected = set(_scalar_defaults(kind))
    if version < 2:  # written before chunk_size, sink_tokens and the serving kinds
        expected -= {"chunk_size", "sink_tokens", "rotary_interleaved"}
    unknown, missing = sorted(set(options) - expected), sorted(expected - set(options))
    if unknown or missing:
        found.append(
            f"options must name exactly {sorted(expected)}; unknown {unknown}, missing {missing}"
        )
        return found
    decoded = _decode_options(options)
    attn = {n: v for n, v in decoded.items() if n in AttentionOptions.names()}
    width = dims["d_nope"] + dims["d_rope"] if kind == "mla" else dims["Dk"]
    scores_shape = (dims["B"], dims["H"], dims["T"], dims["S"])
    if "dropout_mask" in array_options:  # an array option: its shape is checked elsewhere
        attn["dropout_mask"] = np.ones(scores_shape, dtype=bool)
    try:
        opt = AttentionOptions(**attn).validate(scores_shape, head_dim=width)
    except (TypeError, ValueError) as exc:
        return [f"options: {exc}"]
    if kind == "mha" and (decoded["num_heads"], decoded["num_kv_heads"]) != (
        dims["H"],
        dims["Hkv"],
    ):
        found.append("options num_heads and num_kv_heads must equal dims H and Hkv")
    if kind == "kvcache" and not isinstance(decoded["rotary_interleaved"], bool):
        found.append("options rotary_interleaved must be a bool")
    if scale_used != opt.score_scale:
        found.append(
            f"scale_used is {scale_used!r}, but the options and dims give {opt.score_scale!r}"
        )
    return found


def _check_entry(
    i: int, entry: Any, problems: list[Problem], directory: Path, version: int = FORMAT_VERSION
) -> GoldenCase | None:
    """A manifest case entry as a :class:`GoldenCase`, or None (with problems) if it is
    malformed."""
    where = f"cases[{i}]"
    bad: list[str] = []

    def need(name: str, ok: Callable[[Any], bool], what: str) -> Any:
        value = entry.get(name)
        if not ok(value):
            bad.append(f"{name} must be {what}; got {value!r:.80}")
        return value

    if not isinstance(entry, dict):
        problems.append(
            Problem(MANIFEST_NAME, None, f"{where} must be an object; got {entry!r:.80}")
        )
        return None
    name = need(
        "name",
        lambda v: isinstance(v, str) and bool(_NAME.fullmatch(v)),
        f"a str matching {_NAME.pattern}",
    )
    if isinstance(name, str):
        where = f"case {name!r}"
    kind = need("kind", lambda v: v in ALL_KINDS, f"one of {ALL_KINDS}")
    need("description", lambda v: isinstance(v, str), "a str")
    need(
        "tags",
        lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
        "a list of str",
    )
    dims = need(
        "dims",
        lambda v: (
            isinstance(v, dict)
            and kind in ALL_KINDS
            and all(_is_int(v.get(k)) and v[k] > 0 for k in _DIMS[kind])
        ),
        f"an object with positive ints {_DIMS.get(kind, ())}",
    )
    options = need("options", lambda v: isinstance(v, dict), "an object")
    need(
        "scale_used", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
    )
    file = need("file", lambda v: v == f"{name}.npz", f"'{name}.npz'")
    sha = need(
        "sha256",
        lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v)),
        "64 lowercase hex digits",
    )
    size = need("bytes", lambda v: _is_int(v) and v >= 0, "an int >= 0")
    arrays = need("arrays", lambda v: isinstance(v, list) and bool(v), "a non-empty list")
    specs: list[ArraySpec] = []
    for j, a in enumerate(arrays if isinstance(arrays, list) else []):
        ok = (
            isinstance(a, dict)
            and isinstance(a.get("key"), str)
            and bool(_KEY.fullmatch(a["key"]))
            and isinstance(a.get("shape"), list)
            and all(_is_int(n) and n >= 0 for n in a["shape"])
            and a.get("dtype") in _DTYPES
            and isinstance(a.get("sha256"), str)
            and bool(_SHA256.fullmatch(a["sha256"]))
            and isinstance(a.get("nonfinite"), dict)
            and all(_is_int(a["nonfinite"].get(c)) for c in ("neg_inf", "pos_inf", "nan"))
        )
        if not ok:
            bad.append(
                f"arrays[{j}] must have key (group.name), shape (list of ints >= 0), dtype (<f8, "
                f"<i8 or |b1), sha256 and nonfinite counts; got {a!r:.120}"
            )
            continue
        specs.append(
            ArraySpec(
                a["key"],
                tuple(a["shape"]),
                a["dtype"],
                a["sha256"],
                {c: a["nonfinite"][c] for c in ("neg_inf", "pos_inf", "nan")},
            )
        )
    if bad:
        problems += [Problem(MANIFEST_NAME, None, f"{where}: {b}") for b in bad]
        return None
    by_key = {s.key: s for s in specs}
    if len(by_key) != len(specs):
        bad.append("an array key appears twice")
    differentiable = kind in DIFFERENTIABLE_KINDS
    for required in ("cotangent", "output.out") if differentiable else ("output.out",):
        if required not in by_key:
            bad.append(f"no array {required!r}")
    if not differentiable and any(k == "cotangent" or k.startswith("grad.") for k in by_key):
        bad.append(f"a {kind!r} case has no gradients: no cotangent or grad.* array")
    inputs = [k.split(".", 1)[1] for k in by_key if k.startswith("input.")]
    if not inputs:
        bad.append("no input.* array")
    for n in inputs if differentiable else ():
        g = by_key.get(f"grad.{n}")
        if g is None or g.shape != by_key[f"input.{n}"].shape:
            bad.append(
                f"grad.{n} must be listed with input.{n}'s shape {list(by_key[f'input.{n}'].shape)}"
            )
    for k, s in by_key.items():
        if k.startswith("grad.") and f"input.{k[5:]}" not in by_key:
            bad.append(f"{k} has no input.{k[5:]}")
        if s.dtype != "<f8" and not k.startswith("option."):
            bad.append(f"{k} must have dtype <f8; got {s.dtype}")
        if s.dtype == "<i8" and version < 2:
            bad.append(f"{k} has dtype <i8, which format version {version} does not have")
    if (
        "cotangent" in by_key
        and "output.out" in by_key
        and by_key["cotangent"].shape != by_key["output.out"].shape
    ):
        bad.append(
            f"cotangent's shape {list(by_key['cotangent'].shape)} must be output.out's "
            f"{list(by_key['output.out'].shape)}"
        )
    bad += _option_problems(
        kind,
        dims,
        options,
        entry["scale_used"],
        version,
        [k.split(".", 1)[1] for k in by_key if k.startswith("option.")],
    )
    for k, want in _expected_shapes(kind, dims).items():
        if k in by_key and by_key[k].shape != want:
            bad.append(f"{k} has shape {list(by_key[k].shape)} but dims imply {list(want)}")
    if bad:
        problems += [Problem(MANIFEST_NAME, None, f"{where}: {b}") for b in bad]
        return None
    return GoldenCase(
        name=name,
        kind=kind,
        description=entry["description"],
        tags=tuple(entry["tags"]),
        dims=dict(dims),
        options=_decode_options(options),
        scale_used=float(entry["scale_used"]),
        file=file,
        sha256=sha,
        size=size,
        specs=tuple(specs),
        directory=directory,
    )


def _decode_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        n: tuple(v) if isinstance(v, list) else v for n, v in options.items()
    }  # window [l, r] -> (l, r)


def _parse_npy(raw: bytes) -> tuple[str, bool, tuple[int, ...], bytes]:
    """``(descr, fortran_order, shape, data)`` of a ``.npy`` file; ValueError if malformed."""
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)  # ValueError unless b"\x93NUMPY" + 2 version bytes
    if version != (1, 0):
        raise ValueError(f".npy version {version[0]}.{version[1]}; the format uses 1.0")
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    data = raw[f.tell() :]
    expected = math.prod(int(n) for n in shape) * dtype.itemsize  # Python ints: no wrap-around
    if len(data) != expected:
        raise ValueError(
            f"data is {len(data)} bytes, the header's shape {list(shape)} and dtype {dtype.str} "
            f"need {expected} (truncated or padded)"
        )
    return dtype.str, bool(fortran), tuple(int(n) for n in shape), data


def _load_arrays(blob: bytes, case: GoldenCase, problems: list[Problem]) -> dict[str, np.ndarray]:
    """Parse a case's archive and check every array against the manifest; problems are appended."""
    file = case.file
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        RuntimeError,
        NotImplementedError,
        EOFError,
    ) as exc:
        problems.append(
            Problem(file, None, f"not a readable zip archive ({exc}): truncated or overwritten")
        )
        return {}
    arrays: dict[str, np.ndarray] = {}
    with zf:
        infos = {i.filename: i for i in zf.infolist()}
        for extra in sorted(set(infos) - {f"{s.key}.npy" for s in case.specs}):
            problems.append(
                Problem(
                    file, extra.removesuffix(".npy"), "in the file but not listed in manifest.json"
                )
            )
        for spec in case.specs:
            info = infos.get(f"{spec.key}.npy")
            if info is None:
                problems.append(
                    Problem(file, spec.key, "listed in manifest.json but missing from the file")
                )
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                problems.append(
                    Problem(
                        file,
                        spec.key,
                        f"compressed (zip method {info.compress_type}); the format "
                        "stores entries uncompressed (method 0)",
                    )
                )
                continue
            try:
                raw = zf.read(info)  # checks the entry's CRC-32
                descr, fortran, shape, data = _parse_npy(raw)
            except (
                zipfile.BadZipFile,
                ValueError,
                EOFError,
                OSError,
                zlib.error,
                RuntimeError,  # an entry flagged encrypted
                NotImplementedError,  # an unknown compression or zip version
            ) as exc:
                problems.append(Problem(file, spec.key, f"corrupt or unreadable: {exc}"))
                continue
            wrong = []
            if descr != spec.dtype:
                wrong.append(f"dtype {descr} but manifest.json says {spec.dtype}")
            if fortran:
                wrong.append("stored in Fortran order; the format uses C order")
            if shape != spec.shape:
                wrong.append(f"shape {list(shape)} but manifest.json says {list(spec.shape)}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != spec.sha256:
                wrong.append(
                    f"sha256 of the data is {digest}, manifest.json says {spec.sha256} "
                    "(corrupt data)"
                )
            if wrong:
                problems += [Problem(file, spec.key, w) for w in wrong]
                continue
            a = np.frombuffer(data, dtype=_DTYPES[descr]).reshape(
                shape
            )  # read-only view of the bytes
            if _nonfinite(a) != spec.nonfinite:
                problems.append(
                    Problem(
                        file,
                        spec.key,
                        f"nonfinite counts {_nonfinite(a)} but manifest.json says {spec.nonfinite}",
                    )
                )
                continue
            arrays[spec.key] = a
    return arrays


def _read_case(directory: Path, case: GoldenCase, problems: list[Problem]) -> dict[str, np.ndarray]:
    path = directory / case.file
    kind = _entry_kind(path)
    if kind != "file":
        what = {
            "missing": f"missing file (listed in manifest.json for case {case.name!r})",
            "link": "a symbolic link: refused (a golden set's files are regular files)",
        }.get(kind, "not a regular file: refused")
        problems.append(Problem(case.file, None, what))
        return {}
    try:
        size = path.stat().st_size
    except OSError as exc:
        problems.append(Problem(case.file, None, f"cannot be read: {exc.strerror or exc}"))
        return {}
    found: list[Problem] = []
    if size != case.size:  # from the file system, before anything is read
        found.append(
            Problem(
                case.file,
                None,
                f"the file is {size} bytes, manifest.json says {case.size} "
                "(truncated or appended to)",
            )
        )
        if size > 2 * case.size + (1 << 20):  # far too large to be this set's: not read at all
            problems += found
            return {}
    try:
        blob = _read_regular(path)
    except OSError as exc:
        problems += [*found, Problem(case.file, None, f"cannot be read: {exc.strerror or exc}")]
        return {}
    if len(blob) != size:
        found.append(Problem(case.file, None, "the file changed while it was read"))
    arrays = _load_arrays(blob, case, found)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != case.sha256:
        found.append(
            Problem(
                case.file,
                None,
                f"sha256 of the file is {digest}, manifest.json says {case.sha256}"
                + ("" if found else " (every array matches: the zip metadata changed)"),
            )
        )
    problems += found
    return {} if found else arrays


def _entry_kind(path: Path) -> str:
    """``"file"``, ``"link"``, ``"missing"`` or ``"other"``, without following a link."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        return "link"
    return "file" if stat.S_ISREG(mode) else "other"


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file, opened without following a link."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read()


@dataclass(frozen=True, eq=False)
class GoldenCase:
    """One case of a golden set: the manifest's description, and its arrays on demand.

    The arrays are read (and verified again) on the first call of :meth:`arrays`, then kept;
    they are read-only.
    """

    name: str  #: the case's name, also its file's stem
    kind: str  #: "sdpa", "mha", or a serving kind ("paged", "kvcache", "mla", "sparse")
    description: str  #: one line: what the case exercises
    tags: tuple[str, ...]  #: the case's tags
    dims: dict[str, int]  #: B, H, Hkv, T, S, Dk, Dv (MHA also D, Dk_in, Dv_in, D_out)
    options: dict[str, Any]  #: every scalar option of the reference call, defaults included
    scale_used: float  #: the score scale applied (1/sqrt(Dk) unless options["scale"] is given)
    file: str  #: ``<name>.npz``
    sha256: str  #: SHA-256 of the file
    size: int  #: the file's size in bytes (the manifest's ``bytes``)
    specs: tuple[ArraySpec, ...]  #: the arrays as the manifest lists them
    directory: Path = Path(".")  #: the golden set's directory
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the case by key (``input.q``, ``grad.q``, ...), verified; read-only.

        Raises :class:`GoldenError` if the file changed since :func:`read_golden`.
        """
        if not self._cache:
            problems: list[Problem] = []
            arrays = _read_case(self.directory, self, problems)
            if problems:
                raise GoldenError(self.directory, problems)
            self._cache.update(arrays)
        return dict(self._cache)

    def _group(self, group: str) -> dict[str, np.ndarray]:
        return {
            k.split(".", 1)[1]: a for k, a in self.arrays().items() if k.startswith(group + ".")
        }

    def case_data(self) -> CaseData:
        """The case as a :class:`~attention_ref.cases.CaseData` (writable copies of the arrays).

        ``reference function(**data.inputs, **data.options)`` is the case, so the reference,
        ``attention_ref.testing.budget_reports`` and the gradient checkers apply to it.
        """
        scalars = {
            n: v
            for n, v in self.options.items()
            if not (self.kind == "mha" and n in ("num_heads", "num_kv_heads"))
        }
        case = Case(self.name, self.kind, self.description, dict(self.dims), scalars, (), self.tags)
        options = {**self.options, **{n: a.copy() for n, a in self._group("option").items()}}
        inputs = {n: a.copy() for n, a in self._group("input").items()}
        cot = self.arrays().get("cotangent")
        return CaseData(case, inputs, options, None if cot is None else cot.copy())

    def reference(self) -> Reference:
        """The stored output, gradients and intermediates, as a
        :class:`~attention_ref.cases.Reference`."""
        return Reference(
            self.arrays()["output.out"], self._group("grad"), self._group("intermediate")
        )


class GoldenSet:
    """A verified golden directory: the manifest, and each case by name.

    Made by :func:`read_golden`. ``golden["plain"]`` is a :class:`GoldenCase`; iterating gives the
    cases in the manifest's order.
    """

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        manifest_sha256: str,
        cases: Sequence[GoldenCase],
    ):
        self.directory = directory  #: the directory read
        self.manifest = manifest  #: the parsed manifest.json
        self.manifest_sha256 = manifest_sha256  #: SHA-256 of manifest.json's bytes (to pin a set)
        self.cases = tuple(cases)  #: the cases, in the manifest's order

    @property
    def names(self) -> list[str]:
        """The case names, in the manifest's order."""
        return [c.name for c in self.cases]

    @property
    def format_version(self) -> int:
        """The manifest's ``format_version``."""
        return int(self.manifest["format_version"])

    def __getitem__(self, name: str) -> GoldenCase:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(f"no case {name!r} in golden set {self.directory}; it has {self.names}")

    def __iter__(self) -> Iterator[GoldenCase]:
        return iter(self.cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (
            f"GoldenSet({str(self.directory)!r}, {len(self.cases)} cases, format_version "
            f"{self.format_version})"
        )


def read_golden(directory: str | os.PathLike[str]) -> GoldenSet:
    r"""Read a golden directory and verify all of it: manifest, files, arrays and checksums.

    Checks, in order: ``manifest.json`` exists and is valid JSON (no NaN/Infinity literals), its
    ``format`` and ``format_version`` are known, every case entry is well formed and consistent
    (a gradient per input, with its shape; the dims agree with the shapes); then every case's
    file exists and has the manifest's SHA-256, and every array in it is listed, readable
    (zip CRC-32, ``.npy`` header), with the manifest's dtype, shape and SHA-256; and no ``.npz``
    in the directory is missing from the manifest. The arrays themselves are not kept: each
    case reads them again on :meth:`GoldenCase.arrays`.

    Parameters
    ----------
    directory : str or path
        A directory written by :func:`write_golden` (or by any writer of the same format).

    Returns
    -------
    GoldenSet

    Raises
    ------
    GoldenError
        Listing every problem found, each naming the file, the array and what is wrong.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from attention_ref.golden import GoldenError, read_golden, write_golden
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = write_golden(tmp, ["plain", "one_element"])
    ...     print(read_golden(tmp).names)
    ...     Path(tmp, "one_element.npz").unlink()
    ...     try:
    ...         read_golden(tmp)
    ...     except GoldenError as err:
    ...         print(err.problems[0])
    ['plain', 'one_element']
    one_element.npz: missing file (listed in manifest.json for case 'one_element')
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or path; got {type(directory).__name__}")
    path = Path(directory)
    if not path.is_dir():
        raise GoldenError(path, [Problem(".", None, "no such directory")])
    problems: list[Problem] = []
    mpath = path / MANIFEST_NAME
    kind = _entry_kind(mpath)
    if kind != "file":
        what = {
            "missing": "missing file (every golden directory has one)",
            "link": "a symbolic link: refused (a golden set's files are regular files)",
        }.get(kind, "not a regular file: refused")
        raise GoldenError(path, [Problem(MANIFEST_NAME, None, what)])
    if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
        raise GoldenError(
            path,
            [
                Problem(
                    MANIFEST_NAME,
                    None,
                    f"{mpath.stat().st_size} bytes, more than the {_MAX_MANIFEST_BYTES} a "
                    "manifest may have",
                )
            ],
        )
    try:
        raw = _read_regular(mpath)
    except OSError as exc:
        raise GoldenError(
            path, [Problem(MANIFEST_NAME, None, f"cannot be read: {exc.strerror or exc}")]
        ) from None
    manifest = _parse_manifest(raw, problems)
    if manifest is None:
        raise GoldenError(path, problems)
    golden_cases: list[GoldenCase] = []
    for i, entry in enumerate(manifest["cases"]):
        gc = _check_entry(i, entry, problems, path, manifest["format_version"])
        if gc is None:
            continue
        if any(c.name == gc.name for c in golden_cases):
            problems.append(Problem(MANIFEST_NAME, None, f"case {gc.name!r} appears twice"))
            continue
        _read_case(path, gc, problems)
        golden_cases.append(gc)
    listed = {c.file for c in golden_cases} | {
        e.get("file") for e in manifest["cases"] if isinstance(e, dict)
    }
    _check_checksum(manifest, problems)
    for stray in sorted(p.name for p in path.glob("*.npz") if p.name not in listed):
        problems.append(
            Problem(stray, None, "not listed in manifest.json (a case removed from the manifest?)")
        )
    if problems:
        raise GoldenError(path, problems)
    return GoldenSet(path, manifest, hashlib.sha256(raw).hexdigest(), golden_cases)


# ----------------------------------------------------------------------------- verifying


class ArrayResult(NamedTuple):
    """One array of one case, judged."""

    case: str  #: the case's name
    key: str  #: the array's key (``output.out``, ``grad.q``, ``intermediate.logsumexp``)
    passed: bool  #: within the rule
    rule: str  #: the rule applied, e.g. ``rtol=1e-12 atol=1e-14`` or ``budget bfloat16 3x``
    message: str  #: the comparison report (worst error, where, both values), or what is missing
    comparison: Comparison | None  #: the worst error, or None when nothing could be compared

    @property
    def max_abs_error(self) -> float:
        """max \\|actual - reference\\| over entries finite on both sides (NaN if not compared)."""
        return self.comparison.max_abs_error if self.comparison is not None else float("nan")

    @property
    def rel_error(self) -> float:
        """max_abs_error / max \\|reference\\| (NaN if not compared)."""
        return self.comparison.rel_error if self.comparison is not None else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite numbers become null."""
        c = self.comparison
        return {
            "case": self.case,
            "key": self.key,
            "passed": self.passed,
            "rule": self.rule,
            "max_abs_error": json_float(self.max_abs_error),
            "rel_error": json_float(self.rel_error),
            "location": list(c.location) if c is not None else None,
            "nan_mismatch": c.nan_mismatch if c is not None else None,
            "inf_mismatch": c.inf_mismatch if c is not None else None,
            "message": self.message,
        }


_JUDGED = ("output.", "grad.", "intermediate.")


def _judge(
    case: str, key: str, actual: Any, reference: np.ndarray, rtol: float, atol: float
) -> ArrayResult:
    rule = f"rtol={rtol:g} atol={atol:g}"
    try:
        shape = np.shape(actual)
    except (TypeError, ValueError) as exc:
        return ArrayResult(case, key, False, rule, f"not an array: {exc}", None)
    if shape != reference.shape:
        return ArrayResult(
            case,
            key,
            False,
            rule,
            f"shape {list(shape)}, the golden set has {list(reference.shape)}",
            None,
        )
    try:
        comp = compare(actual, reference, name=f"{case} {key}")
        assert_close(
            actual, reference, rtol=rtol, atol=atol, precision="float64", name=f"{case} {key}"
        )
    except AssertionError as exc:
        return ArrayResult(case, key, False, rule, str(exc), comp)
    except (TypeError, ValueError) as exc:
        return ArrayResult(case, key, False, rule, f"cannot be compared: {exc}", None)
    return ArrayResult(case, key, True, rule, str(comp), comp)


def _candidate_from_dir(directory: Path, case: str) -> tuple[dict[str, Any], str | None]:
    path = directory / f"{case}.npz"
    if not path.is_file():
        return {}, f"no {path.name} in the candidate directory {directory}"
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}, None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return {}, f"{path} is not a readable .npz: {exc}"


def _check_tolerance(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value < float("inf")
    ):
        raise ValueError(f"{name} must be None or a finite number >= 0; got {value!r}")
    return float(value)


def verify_golden(
    directory: str | os.PathLike[str] | GoldenSet,
    candidate: str | os.PathLike[str] | Callable[..., Mapping[str, Any]] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    precision: str | None = None,
    cases: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[ArrayResult]:
    r"""Judge an implementation's outputs against a golden set, or the golden set against the
    reference.

    The golden directory is read and verified first (:func:`read_golden`). Then, per case:

    * ``candidate=None`` (self-verification): the reference is recomputed from the stored
      inputs, options and cotangent, and every stored output, gradient and intermediate is
      compared with it. A set written by another version, or corrupted consistently with its
      checksums, fails here.
    * ``candidate`` a directory: its ``<case>.npz`` (any ``.npz`` writer; float32 is fine) must
      hold ``output.out`` and may hold any ``grad.*`` and ``intermediate.*`` keys of the golden
      set; each is compared with the stored array. Other ``input.*``/``option.*``/``cotangent``
      entries are ignored, so a copy of the golden file with the outputs replaced works.
    * ``candidate`` a callable ``candidate(case_name, inputs, options, cotangent) -> dict``: called
      with copies of the stored arrays (``inputs`` by name: ``q``, ``k``, ...; ``options``: every
      scalar option plus the ``mask``/``dropout_mask`` arrays, so that
      ``scaled_dot_product_attention(**inputs, **options)`` is the case), returning arrays under
      the same keys as a candidate file.

    The rule is ``|actual - reference| <= atol + rtol |reference|`` element-wise, NaN facing NaN
    and an infinity the same infinity (``attention_ref.testing.assert_close``), with the
    float64 default of ``attention_ref.testing.DEFAULT_TOLERANCES`` unless ``rtol``/``atol``
    are given. With ``precision`` (a low-precision candidate) ``output.out`` and the gradients
    are judged by the error-budget rule instead (``attention_ref.testing.budget_reports``:
    against the reference computed in that precision from the stored inputs), and intermediates
    by ``rtol``/``atol``, defaulting to ``DEFAULT_TOLERANCES[precision]``.

    Parameters
    ----------
    directory : str, path or GoldenSet
        The golden set.
    candidate : str, path or callable, optional
        See above; None checks the golden set itself.
    rtol, atol : float, optional
        Tolerances of the element-wise rule.
    precision : {"float32", "float16", "bfloat16"}, optional
        The candidate's precision, for the error-budget rule.
    cases : list of str, optional
        Judge only these cases (by default all: a candidate directory must then cover all).
    progress : callable, optional
        Called with one line of text before each case.

    Returns
    -------
    list of ArrayResult
        One per array compared (or missing), in case order.

    Raises
    ------
    GoldenError
        The golden set is corrupt (see :func:`read_golden`).

    Examples
    --------
    >>> import tempfile
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.golden import verify_golden, write_golden
    >>> def mine(name, inputs, options, cotangent):       # an implementation under test
    ...     return {"output.out": scaled_dot_product_attention(**inputs, **options)}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = write_golden(tmp, ["causal_bottom_right_t_gt_s", "gqa"])
    ...     itself = verify_golden(tmp)                  # stored outputs vs a recomputation
    ...     results = verify_golden(tmp, mine)
    >>> all(r.passed for r in itself), [(r.case, r.key, r.passed) for r in results]
    (True, [('causal_bottom_right_t_gt_s', 'output.out', True), ('gqa', 'output.out', True)])
    """
    golden = directory if isinstance(directory, GoldenSet) else read_golden(directory)
    rtol, atol = _check_tolerance("rtol", rtol), _check_tolerance("atol", atol)
    if precision is not None:
        if precision not in PRECISIONS or precision == "float64":
            raise ValueError(
                f"precision must be None or one of {PRECISIONS[1:]} (the error-budget rule); "
                f"got {precision!r}; for float64 give rtol/atol"
            )
        if candidate is None:
            raise ValueError(
                "precision applies to a candidate; self-verification (candidate=None) is float64"
            )
    tol = DEFAULT_TOLERANCES[precision or "float64"]
    rtol = tol.rtol if rtol is None else rtol
    atol = tol.atol if atol is None else atol
    if cases is None:
        names = golden.names
    else:
        if isinstance(cases, str) or not all(isinstance(c, str) for c in cases):
            raise TypeError(f"cases must be None or a list of case names; got {cases!r}")
        unknown = [c for c in cases if c not in golden.names]
        if unknown:
            raise ValueError(
                f"cases must be names in the golden set {golden.names}; got unknown {unknown}"
            )
        names = list(cases)
    cand_dir: Path | None = None
    call: Callable[..., Any] | None = None
    if isinstance(candidate, (str, os.PathLike)):
        cand_dir = Path(candidate)
        if not cand_dir.is_dir():
            raise ValueError(
                f"candidate must be an existing directory, a callable or None; {cand_dir} is not a "
                "directory"
            )
    elif callable(candidate):
        call = candidate
    elif candidate is not None:
        raise TypeError(
            f"candidate must be a directory, a callable or None; got {type(candidate).__name__}"
        )
    say = progress or (lambda msg: None)
    results: list[ArrayResult] = []
    for i, name in enumerate(names, start=1):
        gc = golden[name]
        say(f"verifying {name} ({i}/{len(names)})")
        stored = {k: a for k, a in gc.arrays().items() if k.startswith(_JUDGED)}
        if candidate is None:
            data = gc.case_data()
            ref = data.reference()
            recomputed = {
                "output.out": ref.out,
                **{f"grad.{n}": g for n, g in ref.grads.items()},
                **{f"intermediate.{n}": a for n, a in ref.intermediates.items()},
            }
            for key, a in stored.items():
                if key not in recomputed:
                    results.append(
                        ArrayResult(
                            name,
                            key,
                            False,
                            "",
                            f"attention_ref {__version__} does not compute {key}",
                            None,
                        )
                    )
                else:
                    results.append(_judge(name, key, a, recomputed[key], rtol, atol))
            continue
        if call is None:
            got, missing = _candidate_from_dir(cand_dir or Path("."), name)
            if missing:
                results.append(ArrayResult(name, "output.out", False, "", missing, None))
                continue
            got = {k: v for k, v in got.items() if k.startswith(_JUDGED)}
        else:
            data = gc.case_data()
            returned = call(name, data.inputs, data.options, data.cotangent)
            if not isinstance(returned, Mapping):
                raise TypeError(
                    f"candidate must return a dict of arrays keyed like 'output.out', 'grad.q'; "
                    f"for case {name!r} it returned {type(returned).__name__}"
                )
            got = dict(returned)
        results += _judge_candidate(gc, stored, got, rtol, atol, precision)
    return results


def _judge_candidate(
    gc: GoldenCase,
    stored: Mapping[str, np.ndarray],
    got: Mapping[str, Any],
    rtol: float,
    atol: float,
    precision: str | None,
) -> list[ArrayResult]:
    name = gc.name
    results = [
        ArrayResult(
            name,
            k,
            False,
            "",
            f"the candidate returned {k!r}, which is not an output, gradient "
            f"or intermediate of the golden set (keys: {sorted(stored)})",
            None,
        )
        for k in sorted(set(got) - set(stored))
    ]
    if "output.out" not in got:
        results.append(
            ArrayResult(name, "output.out", False, "", "the candidate has no output.out", None)
        )
    judged = [k for k in stored if k in got]
    budget_keys = (
        [k for k in judged if k == "output.out" or k.startswith("grad.")] if precision else []
    )
    if budget_keys and "output.out" in got:
        shape_ok = [k for k in budget_keys if np.shape(got[k]) == stored[k].shape]
        for k in set(budget_keys) - set(shape_ok):
            results.append(_judge(name, k, got[k], stored[k], rtol, atol))
        if "output.out" in shape_ok:
            grads = {k[5:]: got[k] for k in shape_ok if k.startswith("grad.")}
            reports = budget_reports(
                gc.case_data(),
                got["output.out"],
                grads or None,
                precision=str(precision),
                reference=gc.reference(),
            )
            keys = ["output.out"] + [f"grad.{n}" for n in grads]
            for k, rep in zip(keys, reports, strict=True):
                results.append(
                    ArrayResult(
                        name,
                        k,
                        rep.passed,
                        f"budget {precision} {rep.rtol_budget:g}x",
                        str(rep),
                        rep.candidate,
                    )
                )
        else:
            results += [_judge(name, k, got[k], stored[k], rtol, atol) for k in shape_ok]
        judged = [k for k in judged if k not in budget_keys]
    results += [_judge(name, k, got[k], stored[k], rtol, atol) for k in judged]
    order = {k: i for i, k in enumerate(stored)}
    return sorted(results, key=lambda r: order.get(r.key, len(order)))


# ----------------------------------------------------------------------------- output


def format_results(results: Sequence[ArrayResult], *, fmt: str = "text") -> str:
    """The results as a table with one row per case, the failures in full, and a count line.

    Parameters
    ----------
    results : sequence of ArrayResult
        From :func:`verify_golden`.
    fmt : {"text", "markdown"}
        Aligned text (the default), or a Markdown table (``attention-ref verify --markdown``);
        the failures and the count line below the table are the same in both.

    Returns
    -------
    str

    Examples
    --------
    >>> from attention_ref.golden import ArrayResult, format_results
    >>> ok = ArrayResult("plain", "output.out", True, "rtol=1e-12 atol=1e-14", "", None)
    >>> print(format_results([ok]))
    case   arrays  worst array  max abs err  rel err  result
    --------------------------------------------------------
    plain       1  output.out             -        -  pass
    <BLANKLINE>
    verify: 1 case passed, 0 failed (1 array compared, 0 failed)
    """
    by_case: dict[str, list[ArrayResult]] = {}
    for r in results:
        by_case.setdefault(r.case, []).append(r)
    # The key column is as wide as the longest key of any result, shown or not.
    kw = max([len("worst array")] + [len(r.key) for r in results])
    columns = (
        Column("case"),
        Column("arrays", "right"),
        Column("worst array", min_width=kw),
        Column("max abs err", "right"),
        Column("rel err", "right"),
        Column("result"),
    )

    def badness(r: ArrayResult) -> tuple[bool, float]:
        rel = r.rel_error
        return (
            not r.passed,
            rel if np.isfinite(rel) else (-1.0 if np.isnan(rel) else float("inf")),
        )

    rows = []
    for case, rs in by_case.items():
        worst = max(rs, key=badness)
        err = "-" if worst.comparison is None else f"{worst.max_abs_error:.1e}"
        rel = "-" if worst.comparison is None else f"{worst.rel_error:.1e}"
        verdict = "pass" if all(r.passed for r in rs) else "FAIL"
        rows.append((case, len(rs), worst.key, err, rel, verdict))
    failed = [r for r in results if not r.passed]
    footer = []
    if failed:
        footer.append("failures:")
        for r in failed:
            text = r.message.replace("\n", "\n    ")
            footer.append(f"  {r.case} {r.key} [{r.rule or 'missing'}]:\n    {text}")
        footer.append("")
    bad_cases = sum(not all(r.passed for r in rs) for rs in by_case.values())
    n_ok, n = len(by_case) - bad_cases, len(results)
    footer.append(
        f"verify: {n_ok} case{'s' if n_ok != 1 else ''} passed, {bad_cases} failed "
        f"({n} array{'s' if n != 1 else ''} compared, {len(failed)} failed)"
    )
    return render_table(columns, rows, fmt=fmt, footer=footer)


def _say(quiet: bool) -> Callable[[str], None] | None:
    return None if quiet else (lambda msg: print(f"  {msg} ...", file=sys.stderr, flush=True))


def main_golden(
    directory: str,
    cases: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    as_json: bool = False,
) -> int:
    """``attention-ref golden DIR``: write the golden set; returns the exit status."""
    start = time.perf_counter()
    try:
        manifest = write_golden(directory, cases, overwrite=overwrite, progress=_say(quiet))
    except (FileExistsError, ValueError, TypeError) as exc:
        if as_json:
            print(
                json.dumps(
                    {
                        "command": "golden",
                        "directory": str(directory),
                        "passed": False,
                        "error": str(exc),
                    },
                    indent=1,
                )
            )
        print(f"attention-ref golden: error: {exc}", file=sys.stderr)
        return 2  # usage: nothing was written (the CLI's exit statuses: attention_ref.cli)
    msha = hashlib.sha256((Path(directory) / MANIFEST_NAME).read_bytes()).hexdigest()
    rows = [
        {
            "name": c["name"],
            "kind": c["kind"],
            "file": c["file"],
            "arrays": len(c["arrays"]),
            "bytes": c["bytes"],
            "sha256": c["sha256"],
        }
        for c in manifest["cases"]
    ]
    if as_json:
        print(
            json.dumps(
                {
                    "command": "golden",
                    "directory": str(directory),
                    "passed": True,
                    "format_version": manifest["format_version"],
                    "manifest_sha256": msha,
                    "cases": rows,
                },
                indent=1,
            )
        )
        return 0
    width = max(len("case"), *(len(r["name"]) for r in rows))
    head = f"{'case':<{width}}  kind  arrays  {'KiB':>6}  sha256 (first 16 hex digits)"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:<{width}}  {r['kind']:<4}  {r['arrays']:>6}  {r['bytes'] / 1024:>6.1f}  "
            f"{r['sha256'][:16]}"
        )
    total = sum(r["bytes"] for r in rows)
    print(
        f"\nwrote {len(rows)} cases ({sum(r['arrays'] for r in rows)} arrays, {total / 1024:.1f} "
        f"KiB) and {MANIFEST_NAME} (sha256 {msha}) to {directory} in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


def main_verify(
    directory: str,
    candidate: str | None = None,
    cases: Sequence[str] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    precision: str | None = None,
    quiet: bool = False,
    as_json: bool = False,
    markdown: bool = False,
) -> int:
    """``attention-ref verify DIR [--candidate DIR2]``: returns the exit status (1 on any
    failure)."""
    start = time.perf_counter()
    say = _say(quiet)
    try:
        if say:
            say(f"reading and checking {directory}")
        golden = read_golden(directory)
        results = verify_golden(
            golden, candidate, rtol=rtol, atol=atol, precision=precision, cases=cases, progress=say
        )
    except GoldenError as exc:
        if as_json:
            print(
                json.dumps(
                    {
                        "command": "verify",
                        "directory": str(directory),
                        "passed": False,
                        "error": str(exc),
                        "problems": [p._asdict() for p in exc.problems],
                    },
                    indent=1,
                )
            )
        else:  # one line; --json lists every problem
            more = len(exc.problems) - 1
            print(
                f"verify: FAILED, the golden set {exc.directory} is not valid: {exc.problems[0]}"
                + (
                    f" (and {more} more problem{'s' if more != 1 else ''}; --json lists all)"
                    if more
                    else ""
                )
            )
        return 1
    except (ValueError, TypeError) as exc:
        if as_json:
            print(
                json.dumps(
                    {
                        "command": "verify",
                        "directory": str(directory),
                        "passed": False,
                        "error": str(exc),
                    },
                    indent=1,
                )
            )
        print(f"attention-ref verify: error: {exc}", file=sys.stderr)
        return 2  # usage (the CLI's exit statuses: attention_ref.cli)
    ok = bool(results) and all(r.passed for r in results)
    mode = (
        "stored outputs against a recomputation by attention_ref " + __version__
        if candidate is None
        else f"candidate {candidate} against the stored outputs"
    )
    if as_json:
        print(
            json.dumps(
                {
                    "command": "verify",
                    "directory": str(directory),
                    "candidate": candidate,
                    "passed": ok,
                    "manifest_sha256": golden.manifest_sha256,
                    "format_version": golden.format_version,
                    "precision": precision,
                    "results": [r.as_dict() for r in results],
                },
                indent=1,
            )
        )
        return 0 if ok else 1
    n_arrays = sum(len(c.specs) for c in golden)
    print(
        f"golden set {directory}: {len(golden)} cases, {n_arrays} arrays, every checksum verified "
        f"(format_version {golden.format_version}, manifest sha256 {golden.manifest_sha256})"
    )
    print(f"comparing {mode}\n")
    print(format_results(results, fmt="markdown" if markdown else "text"))
    rules = sorted({r.rule for r in results if r.rule})
    budget_rule = (
        "; budget: error <= factor x the baseline error + floor (attention_ref.testing)"
        if precision
        else ""
    )
    print(
        f"rule: |actual - reference| <= atol + rtol * |reference| element-wise"
        f"{budget_rule}"
        f" -- used: {', '.join(rules) or 'none'} ({time.perf_counter() - start:.1f} s)"
    )
    return 0 if ok else 1
