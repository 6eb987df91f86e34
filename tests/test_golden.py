"""Golden test vectors (attention_ref.golden): write, read back verified, judge implementations.

* Round trip over every canonical case: the arrays read back are the case's own arrays and the
  reference's outputs bit for bit, the set verifies against a recomputation, and writing twice
  gives the same bytes.
* Candidates: a directory written by ``numpy.savez`` from the reference passes and one with a
  1e-6 error planted in one gradient fails naming case and array; an independent loop
  implementation (tests/naive.py) driven only by the manifest's options passes, the same with
  the wrong causal alignment fails exactly on the bottom_right cases; a bfloat16 candidate fails
  the float64 rule and passes the error-budget rule, a bfloat16 candidate with a 5% scale bug
  fails both.
* Corruption is reported, never accepted: a flipped byte in an array, a truncated archive, a
  deleted file, an array missing from or added to an archive, a recompressed archive, and manifest
  edits (checksum, shape, dtype, dims, format version, malformed JSON, a NaN literal, a removed
  case); an edited option that keeps every checksum valid is caught by the self-verification.
* An independent reader (struct + zlib + json + hashlib; no numpy.load, no zipfile) parses a case
  by the steps of docs/golden.md.
* The CLI (``golden`` / ``verify``) round trip, its JSON, and its failures; the page's examples run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from naive import naive_attention

from attention_ref.__main__ import main
from attention_ref.cases import cases, get_case, serving_cases
from attention_ref.golden import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    GoldenError,
    read_golden,
    verify_golden,
    write_golden,
)
from attention_ref.testing import DEFAULT_TOLERANCES, sdpa_baseline

ROOT = Path(__file__).resolve().parents[1]
#: A few cases that cover every kind of array: a bool mask and -inf (padding_empty_rows_zero),
#: an -inf bias (bias_with_neg_inf), a keep-mask (dropout_keep_mask), GQA, MHA with 1-D biases.
SOME = (
    "padding_empty_rows_zero",
    "bias_with_neg_inf",
    "dropout_keep_mask",
    "gqa",
    "mha_gqa_kdim_vdim",
)
#: The planted gradient error: far above the float64 tolerance (1e-12 relative), far below what a
#: look at the numbers would show.
PLANTED = 1e-6


@pytest.fixture(scope="module")
def golden_all(tmp_path_factory) -> Path:
    """Every canonical case, written once for the module (~0.15 s)."""
    d = tmp_path_factory.mktemp("golden") / "all"
    write_golden(d)
    return d


@pytest.fixture
def golden_some(tmp_path) -> Path:
    """A small fresh set that a test may corrupt."""
    d = tmp_path / "golden"
    write_golden(d, SOME)
    return d


def _reference_arrays(name: str) -> dict[str, np.ndarray]:
    """A case's arrays by golden key, computed here from attention_ref.cases, not read from a
    file."""
    data = get_case(name).build()
    ref = data.reference()
    arrays = {f"input.{n}": a for n, a in data.inputs.items()}
    arrays.update({f"option.{n}": a for n, a in data.options.items() if isinstance(a, np.ndarray)})
    if data.cotangent is not None:
        arrays["cotangent"] = data.cotangent
    arrays["output.out"] = ref.out
    arrays.update({f"grad.{n}": g for n, g in ref.grads.items()})
    arrays.update({f"intermediate.{n}": a for n, a in ref.intermediates.items()})
    return arrays


def _outputs(name: str) -> dict[str, np.ndarray]:
    return {
        k: a
        for k, a in _reference_arrays(name).items()
        if k.startswith(("output.", "grad.", "intermediate."))
    }


def _strict_json(text: str):
    def reject(const):
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(text, parse_constant=reject)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_every_canonical_case(golden_all):
    golden = read_golden(golden_all)
    assert golden.names == [c.name for c in cases() + serving_cases()]
    assert golden.format_version == FORMAT_VERSION
    for gc in golden:
        stored = gc.arrays()
        expected = _reference_arrays(gc.name)
        assert list(stored) == list(expected), gc.name  # every array, in the documented order
        for key, a in expected.items():
            want = (
                np.bool_ if a.dtype == np.bool_ else np.int64 if a.dtype.kind == "i" else np.float64
            )
            assert stored[key].dtype == want
            np.testing.assert_array_equal(
                stored[key], a, err_msg=f"{gc.name} {key}"
            )  # bit for bit, -inf too
        assert all(gc.options[k] == v for k, v in get_case(gc.name).options.items()), gc.name
    results = verify_golden(golden)  # stored outputs vs a recomputation from the stored inputs
    assert results and all(r.passed for r in results), [r.message for r in results if not r.passed]
    assert {r.case for r in results} == set(golden.names)
    assert max(r.max_abs_error for r in results) == 0.0  # float64, same code: bit-identical


def test_the_same_cases_give_the_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_golden(a, SOME[:2])
    write_golden(b, SOME[:2])
    for name in [MANIFEST_NAME, *(f"{n}.npz" for n in SOME[:2])]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_stored_options_reproduce_the_case(golden_all):
    """The manifest's options (defaults filled in) are the case: e.g. window becomes a tuple
    again."""
    golden = read_golden(golden_all)
    assert golden["sliding_window_two_sided_bottom_right"].options["window"] == (1, 1)
    assert (
        golden["custom_scale"].scale_used == 0.3 and golden["custom_scale"].options["scale"] == 0.3
    )
    assert golden["gqa"].options["scale"] is None and golden["gqa"].scale_used == 1 / math.sqrt(4)
    assert golden["mha_gqa_kdim_vdim"].options["num_kv_heads"] == 2
    assert golden["plain"].options == {
        "causal": False,
        "align": "top_left",
        "window": None,
        "softcap": None,
        "scale": None,
        "dropout_p": 0.0,
        "empty_rows": "zero",
    }


def test_manifest_is_strict_json_and_counts_the_infinities(golden_all):
    text = (golden_all / MANIFEST_NAME).read_text(
        encoding="ascii"
    )  # ASCII: any JSON parser reads it
    manifest = _strict_json(text)
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
    conv = manifest["conventions"]
    for topic in (
        "layout",
        "mask",
        "causal",
        "window",
        "empty_rows",
        "gqa",
        "weights",
        "order_of_operations",
        "dropout",
        "gradients",
        "intermediates",
        "masked_fill",
    ):
        assert topic in conv, topic
    assert "True = may attend".lower() in conv["mask"].lower()
    assert conv["masked_fill"] == float(np.finfo(np.float64).min)
    by_case = {c["name"]: {a["key"]: a for a in c["arrays"]} for c in manifest["cases"]}
    # the -inf entries of the arrays are counted, never written into the JSON
    assert (
        by_case["bias_with_neg_inf"]["input.bias"]["nonfinite"]["neg_inf"]
        == int(np.isneginf(get_case("bias_with_neg_inf").build().inputs["bias"]).sum())
        > 0
    )
    lse = get_case("padding_empty_rows_zero").build().reference().intermediates["logsumexp"]
    assert (
        by_case["padding_empty_rows_zero"]["intermediate.logsumexp"]["nonfinite"]["neg_inf"]
        == int(np.isneginf(lse).sum())
        > 0
    )
    assert by_case["padding_empty_rows_zero"]["option.mask"]["dtype"] == "|b1"
    keys = [k for c in by_case.values() for k in c]
    assert all(
        re.fullmatch(r"(input|option|output|grad|intermediate)\.[A-Za-z][A-Za-z0-9_]*|cotangent", k)
        for k in keys
    )


def test_arrays_are_read_only_and_case_data_is_a_copy(golden_some):
    gc = read_golden(golden_some)["gqa"]
    with pytest.raises(ValueError):
        gc.arrays()["input.q"][0, 0, 0, 0] = 1.0
    data = gc.case_data()
    data.inputs["q"][...] = 0.0  # a writable copy: the stored arrays are untouched
    np.testing.assert_array_equal(gc.arrays()["input.q"], get_case("gqa").build().inputs["q"])
    np.testing.assert_array_equal(
        gc.reference().grads["v"], get_case("gqa").build().reference().grads["v"]
    )


# ----------------------------------------------------------------------------- candidates


def _write_candidate(
    directory: Path, names, *, plant: tuple[str, str] | None = None, dtype=np.float64
) -> None:
    """A candidate directory as another implementation would write it: numpy.savez (ZIP64 headers,
    unlike the golden files), outputs from the reference recomputed here."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        arrays = {k: a.astype(dtype) for k, a in _outputs(name).items()}
        if plant is not None and plant[0] == name:
            a = arrays[plant[1]]
            i = np.unravel_index(np.argmax(np.abs(a)), a.shape)
            a[i] *= 1 + PLANTED
        np.savez(directory / f"{name}.npz", **arrays)


def test_candidate_directory_passes_and_a_planted_gradient_error_fails(golden_all, tmp_path):
    names = [c.name for c in cases() + serving_cases()]
    good = tmp_path / "good"
    _write_candidate(good, names)
    results = verify_golden(golden_all, good)
    assert all(r.passed for r in results)
    assert len(results) == sum(len(_outputs(n)) for n in names)

    bad = tmp_path / "bad"
    _write_candidate(bad, names, plant=("gqa", "grad.k"))
    results = verify_golden(golden_all, bad)
    failed = [r for r in results if not r.passed]
    assert [(r.case, r.key) for r in failed] == [("gqa", "grad.k")]
    assert failed[0].rel_error == pytest.approx(PLANTED, rel=0.01)
    assert "gqa grad.k" in failed[0].message and "rtol = 1e-12" in failed[0].message


def test_candidate_gaps_and_unknown_keys_fail(golden_some, tmp_path):
    cand = tmp_path / "cand"
    cand.mkdir()
    outs = _outputs("gqa")
    np.savez(cand / "gqa.npz", **{k: a for k, a in outs.items() if k != "output.out"})
    np.savez(
        cand / "dropout_keep_mask.npz",
        **_outputs("dropout_keep_mask"),
        **{"grad.dropout_mask": np.zeros(1)},
    )
    np.savez(
        cand / "bias_with_neg_inf.npz", **{"output.out": np.zeros((2, 2, 3, 5))}
    )  # wrong shape
    results = verify_golden(
        golden_some,
        cand,
        cases=["gqa", "dropout_keep_mask", "bias_with_neg_inf", "mha_gqa_kdim_vdim"],
    )
    failed = {(r.case, r.key): r.message for r in results if not r.passed}
    assert "no output.out" in failed[("gqa", "output.out")]
    assert (
        "not an output, gradient or intermediate"
        in failed[("dropout_keep_mask", "grad.dropout_mask")]
    )
    assert "shape [2, 2, 3, 5]" in failed[("bias_with_neg_inf", "output.out")]
    assert "no mha_gqa_kdim_vdim.npz" in failed[("mha_gqa_kdim_vdim", "output.out")]
    assert all(
        r.passed for r in results if r.case == "gqa" and r.key != "output.out"
    )  # the grads it has


def _naive_candidate(align_override=None):
    def candidate(name, inputs, options, cotangent):
        opts = dict(options)
        keep = opts.pop("dropout_mask", None)
        if align_override is not None:
            opts["align"] = align_override
        return {"output.out": naive_attention(**inputs, **opts, keep=keep)}

    return candidate


def test_callable_candidate_independent_implementation(golden_all):
    """tests/naive.py, written from the conventions with loops, gets only what the golden set
    holds."""
    names = [c.name for c in cases("sdpa")]
    results = verify_golden(golden_all, _naive_candidate(), cases=names)
    assert [r.case for r in results] == names and all(r.passed for r in results), [
        r.message for r in results if not r.passed
    ]
    # the wrong causal/window alignment fails exactly the cases that use bottom_right (all
    # have T != S)
    results = verify_golden(golden_all, _naive_candidate("top_left"), cases=names)
    bottom_right = {c.name for c in cases("sdpa") if c.options.get("align") == "bottom_right"}
    assert len(bottom_right) >= 4
    assert {r.case for r in results if not r.passed} == bottom_right


def test_callable_gets_copies(golden_some):
    def vandal(name, inputs, options, cotangent):
        out = scaled(inputs, options)
        for a in (*inputs.values(), cotangent):
            a[...] = 0.0
        return {"output.out": out}

    def scaled(inputs, options):
        from attention_ref import scaled_dot_product_attention

        return scaled_dot_product_attention(**inputs, **options)

    assert all(
        r.passed for r in verify_golden(golden_some, vandal, cases=["gqa", "bias_with_neg_inf"])
    )
    assert all(r.passed for r in verify_golden(golden_some))  # the stored arrays are untouched


def test_low_precision_candidate_uses_the_budget_rule(golden_some):
    """A bfloat16 candidate (the reference staged in bfloat16, q scaled first) is far outside the
    float64 rule and within the error budget; one with the scale 5% off is over budget. (On these
    tiny cases bfloat16's own error, u = 2^-8 = 0.4%, hides a 1% scale error within the 2x
    budget.)"""

    def bf16(scale_factor=1.0):
        def candidate(name, inputs, options, cotangent):
            scale = options.get("scale") or 1 / math.sqrt(inputs["q"].shape[-1])
            opts = {**options, "scale": scale * scale_factor}
            base = sdpa_baseline(
                **inputs, dout=cotangent, precision="bfloat16", reorder=True, **opts
            )
            return {"output.out": base.out, **{f"grad.{n}": g for n, g in base.grads.items()}}

        return candidate

    names = ["gqa", "bias_with_neg_inf", "dropout_keep_mask"]
    assert not any(r.passed for r in verify_golden(golden_some, bf16(), cases=names))
    results = verify_golden(golden_some, bf16(), cases=names, precision="bfloat16")
    assert all(r.passed for r in results) and all(
        r.rule.startswith("budget bfloat16") for r in results
    )
    assert {r.key for r in results if r.case == "gqa"} == {
        "output.out",
        "grad.q",
        "grad.k",
        "grad.v",
    }
    results = verify_golden(golden_some, bf16(1.05), cases=names, precision="bfloat16")
    assert {r.case for r in results if not r.passed and r.key == "output.out"} == set(names)
    assert "OVER BUDGET" in next(r.message for r in results if not r.passed)


# ----------------------------------------------------------------------------- corruption


def _entry_data_span(blob: bytes, key: str) -> tuple[int, int]:
    """Byte range of an array's data (after the .npy header) inside the archive."""
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        info = zf.getinfo(f"{key}.npy")
    name_len, extra_len = struct.unpack(
        "<HH", blob[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    (header_len,) = struct.unpack("<H", blob[start + 8 : start + 10])
    return start + 10 + header_len, start + info.file_size


def _rezip(
    path: Path, *, drop=(), add=None, compression=zipfile.ZIP_STORED, npy_version=None
) -> None:
    with zipfile.ZipFile(path) as zf:
        entries = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, raw in entries:
            if name.removesuffix(".npy") not in drop:
                zf.writestr(name, raw)
        for key, a in (add or {}).items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, version=npy_version)
            zf.writestr(f"{key}.npy", buf.getvalue())


def _rewrite_gqa_q(d: Path, transform=lambda a: a, npy_version=None) -> None:
    """Rewrite input.q of gqa.npz (valid zip, valid CRC) as ``transform(q)`` in another .npy
    form."""
    q = get_case("gqa").build().inputs["q"]
    _rezip(d / "gqa.npz", drop=("input.q",), add={"input.q": transform(q)}, npy_version=npy_version)


def _flip_byte_in_array(d: Path) -> None:
    path = d / "gqa.npz"
    blob = bytearray(path.read_bytes())
    start, end = _entry_data_span(bytes(blob), "grad.k")
    blob[(start + end) // 2] ^= 0x01  # one bit of one float64 of grad.k
    path.write_bytes(bytes(blob))


def _edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / MANIFEST_NAME).read_text())
    edit(m)
    (d / MANIFEST_NAME).write_text(json.dumps(m, indent=1))


def _array(m, case, key):
    return next(a for c in m["cases"] if c["name"] == case for a in c["arrays"] if a["key"] == key)


def _case(m, name):
    return next(c for c in m["cases"] if c["name"] == name)


CORRUPTIONS = {
    # name: (corrupt(d), expected file, expected array or None, words in the problem)
    "flipped byte in an array": (_flip_byte_in_array, "gqa.npz", "grad.k", ("CRC",)),
    "truncated archive": (
        lambda d: (d / "gqa.npz").write_bytes((d / "gqa.npz").read_bytes()[:-100]),
        "gqa.npz",
        None,
        ("bytes, manifest.json says", "truncated"),
    ),
    "deleted file": (lambda d: (d / "gqa.npz").unlink(), "gqa.npz", None, ("missing file",)),
    "array missing from the file": (
        lambda d: _rezip(d / "gqa.npz", drop=("grad.v",)),
        "gqa.npz",
        "grad.v",
        ("missing from the file",),
    ),
    "array added to the file": (
        lambda d: _rezip(d / "gqa.npz", add={"grad.extra": np.zeros(3)}),
        "gqa.npz",
        "grad.extra",
        ("not listed in manifest.json",),
    ),
    "npy version 2.0": (
        lambda d: _rewrite_gqa_q(d, npy_version=(2, 0)),
        "gqa.npz",
        "input.q",
        (".npy version 2.0",),
    ),
    "Fortran order": (
        lambda d: _rewrite_gqa_q(d, np.asfortranarray),
        "gqa.npz",
        "input.q",
        ("Fortran order",),
    ),
    "recompressed archive": (
        lambda d: _rezip(d / "gqa.npz", compression=zipfile.ZIP_DEFLATED),
        "gqa.npz",
        "input.q",
        ("compressed",),
    ),
    "deleted manifest": (
        lambda d: (d / MANIFEST_NAME).unlink(),
        MANIFEST_NAME,
        None,
        ("missing file",),
    ),
    "edited array checksum": (
        lambda d: _edit_manifest(d, lambda m: _array(m, "gqa", "grad.q").update(sha256="0" * 64)),
        "gqa.npz",
        "grad.q",
        ("sha256", "corrupt data"),
    ),
    "edited array shape": (
        lambda d: _edit_manifest(
            d, lambda m: _array(m, "gqa", "intermediate.probs").update(shape=[2, 4, 5, 3])
        ),
        "gqa.npz",
        "intermediate.probs",
        ("shape [2, 4, 3, 5] but manifest.json says [2, 4, 5, 3]",),
    ),
    "edited dtype": (
        lambda d: _edit_manifest(
            d, lambda m: _array(m, "padding_empty_rows_zero", "option.mask").update(dtype="<f8")
        ),
        "padding_empty_rows_zero.npz",
        "option.mask",
        ("dtype |b1 but manifest.json says <f8",),
    ),
    "edited dims": (
        lambda d: _edit_manifest(d, lambda m: _case(m, "gqa")["dims"].update(T=4)),
        MANIFEST_NAME,
        None,
        ("case 'gqa'", "dims imply"),
    ),
    "unknown format version": (
        lambda d: _edit_manifest(d, lambda m: m.update(format_version=3)),
        MANIFEST_NAME,
        None,
        ("unknown format_version 3",),
    ),
    "malformed JSON": (
        lambda d: (d / MANIFEST_NAME).write_text((d / MANIFEST_NAME).read_text()[:-30]),
        MANIFEST_NAME,
        None,
        ("malformed JSON",),
    ),
    "repeated JSON key": (
        lambda d: (d / MANIFEST_NAME).write_text(
            (d / MANIFEST_NAME)
            .read_text()
            .replace('"kind": "sdpa",', '"kind": "sdpa", "kind": "mha",', 1)
        ),
        MANIFEST_NAME,
        None,
        ("malformed JSON", "repeats the key(s) ['kind']"),
    ),
    "NaN literal": (
        lambda d: (d / MANIFEST_NAME).write_text(
            re.sub(
                r'"scale_used": [0-9.e-]+',
                '"scale_used": NaN',
                (d / MANIFEST_NAME).read_text(),
                count=1,
            )
        ),
        MANIFEST_NAME,
        None,
        ("malformed JSON", "NaN"),
    ),
    "case removed from the manifest": (
        lambda d: _edit_manifest(d, lambda m: m["cases"].remove(_case(m, "gqa"))),
        "gqa.npz",
        None,
        ("not listed in manifest.json",),
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_is_reported(golden_some, kind):
    corrupt, file, array, words = CORRUPTIONS[kind]
    read_golden(golden_some)  # valid before
    corrupt(golden_some)
    with pytest.raises(GoldenError) as err:
        read_golden(golden_some)
    matching = [p for p in err.value.problems if p.file == file and p.array == array]
    assert matching, f"{kind}: no problem for {file} {array}: {err.value}"
    assert all(w in matching[0].what for w in words), matching[0]
    assert file in str(err.value) and (array is None or repr(array) in str(err.value))
    with pytest.raises(GoldenError):
        verify_golden(golden_some)  # never accepted for verification either


def test_a_changed_file_is_reported_with_the_array_that_changed(golden_some):
    """Rewriting an array (valid zip, valid CRC) is caught by the file and the array checksums."""
    _rezip(
        golden_some / "gqa.npz",
        drop=("grad.k",),
        add={"grad.k": get_case("gqa").build().reference().grads["k"] * 2},
    )
    with pytest.raises(GoldenError) as err:
        read_golden(golden_some)
    by = {(p.file, p.array): p.what for p in err.value.problems}
    assert "corrupt data" in by[("gqa.npz", "grad.k")]
    assert "sha256 of the file" in by[("gqa.npz", None)]


def test_an_edited_option_is_caught_by_the_reader_and_by_self_verification(golden_some):
    """The manifest's checksum and its recomputed scale_used catch an edited option; an edit
    that also rewrites both is caught by the recomputation of the outputs."""
    from attention_ref.oracle.golden import _manifest_checksum

    _edit_manifest(golden_some, lambda m: _case(m, "gqa")["options"].update(scale=0.4))
    with pytest.raises(GoldenError, match="scale_used") as exc:
        read_golden(golden_some)
    assert "checksum" in str(exc.value)

    def forge(m):
        _case(m, "gqa")["scale_used"] = 0.4
        m["checksum"] = {"sha256": _manifest_checksum(m)}

    _edit_manifest(golden_some, forge)
    golden = read_golden(golden_some)  # a consistent forgery reads
    failed = [r for r in verify_golden(golden) if not r.passed]
    assert failed and {r.case for r in failed} == {"gqa"}
    assert "output.out" in {r.key for r in failed}


def test_a_file_changed_after_reading_is_not_served(golden_some):
    golden = read_golden(golden_some)
    _flip_byte_in_array(golden_some)
    with pytest.raises(GoldenError, match="gqa.npz"):
        golden["gqa"].arrays()


# -------------------------------------------------------------- the documented format, read by hand


def _read_zip_by_hand(blob: bytes) -> dict[str, bytes]:
    """Entries of a stored zip: end-of-central-directory -> central directory -> local headers."""
    eocd = blob.rfind(b"PK\x05\x06")
    n_entries, cd_size, cd_offset = struct.unpack("<HII", blob[eocd + 10 : eocd + 20])
    entries, pos = {}, cd_offset
    for _ in range(n_entries):
        (sig, method, crc, csize, usize, nlen, xlen, clen, local) = struct.unpack(
            "<I6xH4xIIIHHH8xI", blob[pos : pos + 46]
        )
        assert sig == 0x02014B50 and method == 0 and csize == usize  # stored, uncompressed
        name = blob[pos + 46 : pos + 46 + nlen].decode("ascii")
        pos += 46 + nlen + xlen + clen
        lsig, lnlen, lxlen = struct.unpack("<I22xHH", blob[local : local + 30])
        assert lsig == 0x04034B50
        data = blob[local + 30 + lnlen + lxlen : local + 30 + lnlen + lxlen + csize]
        assert zlib.crc32(data) == crc
        entries[name] = data
    return entries


def _parse_npy_by_hand(raw: bytes):
    """(descr, shape, data bytes) by the 10-byte prefix and the header dict."""
    assert raw[:6] == b"\x93NUMPY" and raw[6:8] == b"\x01\x00"
    (header_len,) = struct.unpack("<H", raw[8:10])
    header = raw[10 : 10 + header_len].decode("latin1")
    assert (10 + header_len) % 64 == 0 and header.endswith("\n")
    descr = re.search(r"'descr': '([^']*)'", header).group(1)
    assert re.search(r"'fortran_order': False", header)
    shape = tuple(
        int(n) for n in re.findall(r"\d+", re.search(r"'shape': \(([^)]*)\)", header).group(1))
    )
    return descr, shape, raw[10 + header_len :]


@pytest.mark.parametrize("name", ["padding_empty_rows_zero", "mha_mqa_no_bias_attention_bias"])
def test_independent_reader_by_the_documented_format(golden_all, name):
    manifest = json.loads((golden_all / MANIFEST_NAME).read_text())
    entry = next(c for c in manifest["cases"] if c["name"] == name)
    blob = (golden_all / entry["file"]).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
    entries = _read_zip_by_hand(blob)
    assert list(entries) == [f"{a['key']}.npy" for a in entry["arrays"]]
    expected = _reference_arrays(name)
    for spec in entry["arrays"]:
        descr, shape, data = _parse_npy_by_hand(entries[f"{spec['key']}.npy"])
        assert (descr, list(shape)) == (spec["dtype"], spec["shape"])
        assert hashlib.sha256(data).hexdigest() == spec["sha256"]
        n = math.prod(shape)
        if descr == "<f8":
            values = struct.unpack(f"<{n}d", data)
        else:
            assert descr == "|b1" and set(data) <= {0, 1}
            values = tuple(b == 1 for b in data)
        # row-major: the flat order of the numpy array, compared bit for bit (-inf included)
        assert values == tuple(expected[spec["key"]].reshape(-1).tolist()), spec["key"]
        assert sum(v == -math.inf for v in values) == spec["nonfinite"]["neg_inf"]


# ----------------------------------------------------------------------------- writing rules


def test_write_refuses_a_non_empty_directory_unless_asked(tmp_path):
    d = tmp_path / "g"
    write_golden(d, ["plain", "gqa", "mqa"])
    (d / "README.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_golden(d, ["plain"])
    write_golden(d, ["one_element"], overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["README.txt", MANIFEST_NAME, "one_element.npz"]
    assert read_golden(d).names == ["one_element"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.npz").write_bytes(b"not mine to delete")
    with pytest.raises(FileExistsError, match="not a golden set"):
        write_golden(other, ["plain"], overwrite=True)
    assert (other / "data.npz").read_bytes() == b"not mine to delete"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        write_golden(tmp_path / "file", ["plain"])


def test_a_case_that_fails_leaves_the_directory_as_it_was(tmp_path):
    from attention_ref.cases import Case

    d = tmp_path / "g"
    write_golden(d, ["plain"])
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    broken = Case(
        "broken", "sdpa", "an invalid option", get_case("plain").dims, {"align": "middle"}
    )
    with pytest.raises(ValueError, match="align"):
        write_golden(d, ["gqa", broken], overwrite=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_arguments_are_validated(tmp_path, golden_some):
    with pytest.raises(ValueError, match="no canonical case named 'nope'"):
        write_golden(tmp_path / "a", ["plain", "nope"])
    with pytest.raises(ValueError, match="'plain' appears twice"):
        write_golden(tmp_path / "b", ["plain", "plain"])
    with pytest.raises(TypeError, match="list of case names"):
        write_golden(tmp_path / "c", "plain")
    with pytest.raises(ValueError, match="at least one case"):
        write_golden(tmp_path / "d", [])
    with pytest.raises(ValueError, match="rtol must be"):
        verify_golden(golden_some, rtol=-1.0)
    with pytest.raises(ValueError, match="precision must be"):
        verify_golden(golden_some, _naive_candidate(), precision="float64")
    with pytest.raises(ValueError, match="precision applies to a candidate"):
        verify_golden(golden_some, precision="bfloat16")
    with pytest.raises(ValueError, match=r"unknown \['plain'\]"):
        verify_golden(golden_some, cases=["plain"])
    with pytest.raises(ValueError, match="not a directory"):
        verify_golden(golden_some, tmp_path / "absent")
    with pytest.raises(TypeError, match="candidate must be"):
        verify_golden(golden_some, 3)
    with pytest.raises(GoldenError, match="no such directory"):
        read_golden(tmp_path / "absent")


def test_default_tolerance_is_the_float64_one(golden_some):
    results = verify_golden(golden_some, cases=["gqa"])
    tol = DEFAULT_TOLERANCES["float64"]
    assert {r.rule for r in results} == {f"rtol={tol.rtol:g} atol={tol.atol:g}"}


# ----------------------------------------------------------------------------- command line


def test_cli_round_trip(tmp_path, capsys):
    d = tmp_path / "g"
    assert main(["golden", str(d), "--cases", "plain", "gqa", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 cases" in out and "gqa" in out
    assert main(["verify", str(d), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "every checksum verified" in out and "verify: 2 cases passed, 0 failed" in out

    cand = tmp_path / "cand"
    _write_candidate(cand, ["plain", "gqa"], plant=("plain", "grad.v"))
    assert main(["verify", str(d), "--candidate", str(cand), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "verify: 1 case passed, 1 failed" in out
    assert re.search(r"^plain .* FAIL$", out, flags=re.M) and "plain grad.v" in out

    assert main(["verify", str(d), "--candidate", str(cand), "--quiet", "--json"]) == 1
    doc = _strict_json(capsys.readouterr().out)
    assert doc["command"] == "verify" and doc["passed"] is False
    assert [(r["case"], r["key"]) for r in doc["results"] if not r["passed"]] == [
        ("plain", "grad.v")
    ]


def test_cli_json_and_progress(tmp_path, capsys):
    d = tmp_path / "g"
    assert main(["golden", str(d), "--cases", "one_element", "--json"]) == 0
    captured = capsys.readouterr()
    doc = _strict_json(captured.out)
    assert (
        doc["passed"]
        and doc["cases"][0]["name"] == "one_element"
        and len(doc["manifest_sha256"]) == 64
    )
    assert "computing one_element (1/1)" in captured.err  # progress on stderr, not in the JSON
    assert main(["verify", str(d), "--json"]) == 0
    captured = capsys.readouterr()
    doc = _strict_json(captured.out)
    assert (
        doc["passed"]
        and doc["manifest_sha256"] == hashlib.sha256((d / MANIFEST_NAME).read_bytes()).hexdigest()
    )
    assert "verifying one_element (1/1)" in captured.err


def test_cli_reports_corruption_and_refusals(tmp_path, capsys):
    d = tmp_path / "g"
    write_golden(d, ["gqa"])
    assert main(["golden", str(d), "--cases", "gqa", "--quiet"]) == 2  # usage: refused
    assert "--overwrite" in capsys.readouterr().err
    assert main(["golden", str(d), "--cases", "gqa", "--quiet", "--overwrite"]) == 0
    capsys.readouterr()
    _flip_byte_in_array(d)
    assert main(["verify", str(d), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "gqa.npz: array 'grad.k'" in out and "not valid" in out
    assert main(["verify", str(d), "--quiet", "--json"]) == 1
    doc = _strict_json(capsys.readouterr().out)
    assert (
        not doc["passed"]
        and {"file": "gqa.npz", "array": "grad.k"}.items() <= doc["problems"][0].items()
    )


def test_cli_help(capsys):
    for command in ("golden", "verify"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--json" in text and "--quiet" in text
    assert "--candidate DIR2" in text and "error-budget" in text


# ----------------------------------------------------------------------------- docs


def test_docs_page_examples_run(tmp_path, monkeypatch):
    """The python blocks of docs/golden.md, top to bottom in one namespace (they write only to
    temporary directories)."""
    text = (ROOT / "docs" / "golden.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # anything written to a relative path lands here
    namespace: dict = {"__name__": "docs_golden"}
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/golden.md (python block {i})", "exec"), namespace)
    assert not list(tmp_path.iterdir()), "the page's examples wrote outside a temporary directory"


def test_serving_cases_store_their_index_arrays_as_int64(tmp_path):
    d = tmp_path / "g"
    manifest = write_golden(d, ["paged_gqa_causal", "kvcache_rotary_append", "sparse_topk_gqa"])
    dtypes = {(c["name"], a["key"]): a["dtype"] for c in manifest["cases"] for a in c["arrays"]}
    assert dtypes["paged_gqa_causal", "option.block_table"] == "<i8"
    assert dtypes["sparse_topk_gqa", "option.indices"] == "<i8"
    kv = read_golden(d)["kvcache_rotary_append"]
    assert not any(k == "cotangent" or k.startswith("grad.") for k in kv.arrays())  # inference
    assert all(r.passed for r in verify_golden(d))
    # a version-1 manifest has no <i8, and an inference-only case no gradient
    _edit_manifest(d, lambda m: m.update(format_version=1))
    with pytest.raises(GoldenError, match="<i8, which format version 1 does not have"):
        read_golden(d)


def test_the_shipped_schema_accepts_every_written_manifest_and_refuses_edits(golden_all):
    jsonschema = pytest.importorskip("jsonschema")
    from attention_ref.golden import MANIFEST_SCHEMA

    schema = json.loads(MANIFEST_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    manifest = json.loads((golden_all / MANIFEST_NAME).read_text())
    jsonschema.validate(manifest, schema)  # every kind, every field
    edits = {
        "unknown option": lambda m: m["cases"][0]["options"].update(bausal=True),
        "a dtype the format lacks": lambda m: m["cases"][0]["arrays"][0].update(dtype="<f4"),
        "a negative dimension": lambda m: m["cases"][0]["dims"].update(T=-1),
        "an extra field": lambda m: m.update(comment="hi"),
        "no checksum": lambda m: m.pop("checksum"),
    }
    for what, edit in edits.items():
        bad = json.loads(json.dumps(manifest))
        edit(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        # and the reader, which does not need jsonschema, refuses the same edit
        with pytest.raises(GoldenError):
            _check_whole_manifest(golden_all, bad)
        assert what


def _check_whole_manifest(d: Path, manifest: dict) -> None:
    work = d.parent / "schema_edit"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(d, work)
    (work / MANIFEST_NAME).write_text(json.dumps(manifest))
    read_golden(work)
