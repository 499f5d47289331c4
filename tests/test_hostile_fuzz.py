"""Fuzzed DICOM: every case ends in a Volume or one MedfoundError, within time and memory.

Cases are mutations of pydicom's shipped test files and of a small CT series written by
tests/dicom_factory.py: truncations, bit flips in the header, huge or zero sizes, bad bit
depths, non-numeric / non-finite values, wrong transfer syntaxes, degenerate geometry. Each is
read in this process through `read_volume` with a voxel budget; a case fails the suite if it
raises anything but MedfoundError, takes longer than CASE_SECONDS, or raises the process's
peak resident memory by more than CASE_RSS_BYTES. The fast sample runs in `make test`, the
whole sweep (`long`) in `make test-long`.
"""

from __future__ import annotations

import random
import resource
import shutil
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.config import disable_value_validation
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from dicom_factory import ramp, write_series
from medfound.errors import MedfoundError
from medfound.io.reader import read_volume

CASE_SECONDS = 20.0
CASE_RSS_BYTES = 1 * 2**30
FUZZ_MAX_VOXELS = 32 * 2**20  # 128 MiB of float32: far above every base file
BASES = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
         "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_bigendian.dcm",
         "MR_small_implicit.dcm", "rtdose_rle.dcm", "SC_rgb_rle_2frame.dcm")
SERIES = "series"  # the written CT series, one slice of it mutated
PHANTOM = "phantom"  # a phantom CT series (medfound.data.phantoms), one slice of it mutated

# (keyword, values) set in the header; strings are written as they are, unvalidated.
FIELDS: list[tuple[str, list]] = [
    ("Rows", [0, 1, 65535]),
    ("Columns", [0, 65535]),
    ("NumberOfFrames", ["2147483647", "0", "-5", "abc", "1e9", "3"]),
    ("BitsAllocated", [0, 7, 64, 65535]),
    ("BitsStored", [0, 40, 65535]),
    ("SamplesPerPixel", [0, 3, 255]),
    ("PixelRepresentation", [2, 65535]),
    ("PlanarConfiguration", [7]),
    ("PhotometricInterpretation", ["PALETTE COLOR", "YBR_FULL_422", "XYZ"]),
    ("RescaleIntercept", ["nan", "abc", "1e309", "-inf", "1\\2"]),
    ("RescaleSlope", ["0", "nan", "1e308", "abc"]),
    ("PixelSpacing", ["0\\0", "-1\\1", "nan\\1", "1e308\\1", "100\\100", "abc"]),
    ("ImageOrientationPatient", ["0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0", "nan\\0\\0\\0\\1\\0",
                                 "1\\0\\0"]),
    ("ImagePositionPatient", ["nan\\0\\0", "1e308\\0\\0", "abc"]),
    ("SliceThickness", ["1e300", "-0", "nan"]),
    ("SpacingBetweenSlices", ["0", "1e300"]),
]
SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
            JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless, RLELossless, "1.2.3.4.5"]


TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _base_path(name: str) -> Path:
    """A file pydicom ships (never downloaded)."""
    return TEST_FILES / name


def _set(ds: pydicom.Dataset, keyword: str, value) -> None:
    with disable_value_validation():
        if keyword not in ds:
            setattr(ds, keyword, "1" if isinstance(value, str) else 1)
        elem = ds[keyword]
        if isinstance(value, str) and "\\" in value:
            value = value.split("\\")
        elem._value = value  # as given, unconverted: the bytes a hostile file would hold


def _cases() -> list[tuple[str, str, str, object]]:
    """(id, base, mutation, argument) for every case, in a fixed order."""
    cases = []
    rng = random.Random(23)
    for base in (*BASES, SERIES, PHANTOM):
        for keyword, values in FIELDS:
            for v in values:
                cases.append((f"{base}:{keyword}={v}", base, "field", (keyword, v)))
        for ts in SYNTAXES:
            cases.append((f"{base}:ts={ts}", base, "syntax", ts))
        for frac in (0.02, 0.1, 0.3, 0.6, 0.9, 0.999):
            cases.append((f"{base}:cut={frac}", base, "cut", frac))
        for n in range(6):
            cases.append((f"{base}:flip{n}", base, "flip", rng.randrange(2**31)))
    return cases


CASES = _cases()
SAMPLE = CASES[::max(1, len(CASES) // 60)][:60]
SAMPLE += [c for c in CASES if c[1] == PHANTOM][::20]  # the phantom series, a few times


def _mutated_file(src: Path, dst: Path, kind: str, arg) -> None:
    data = src.read_bytes()
    if kind == "cut":
        dst.write_bytes(data[: max(1, int(len(data) * arg))])
        return
    if kind == "flip":
        rng = random.Random(arg)
        buf = bytearray(data)
        header = min(len(buf), 2048)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(128 if header > 132 else 0, header)
            buf[i] ^= 1 << rng.randrange(8)
        dst.write_bytes(bytes(buf))
        return
    ds = pydicom.dcmread(src)
    if kind == "field":
        _set(ds, *arg)
    elif kind == "syntax":
        # Declares the syntax without converting the pixels: a wrong or unknown encoding.
        ds.file_meta.TransferSyntaxUID = arg
    with disable_value_validation():
        try:
            ds.save_as(dst, enforce_file_format=False)
        except Exception:  # noqa: BLE001 - pydicom cannot write this mutation: keep the base
            shutil.copy(src, dst)


def _target(tmp: Path, base: str, kind: str, arg, phantom: Path) -> Path:
    if base not in (SERIES, PHANTOM):
        path = tmp / "case.dcm"
        _mutated_file(_base_path(base), path, kind, arg)
        return path
    folder = tmp / "series"
    if base == SERIES:
        paths = write_series(folder, ramp((24, 20, 6)))
    else:
        shutil.copytree(phantom, folder)
        paths = sorted(folder.glob("*.dcm"))
    edge = zlib.crc32(f"{kind}{arg}".encode()) & 1  # the first or the last slice
    victim = paths[edge * (len(paths) - 1)]
    original = tmp / "orig.dcm"
    shutil.move(victim, original)
    _mutated_file(original, victim, kind, arg)
    original.unlink()
    return folder


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _run(case, tmp: Path, phantom: Path) -> tuple[str, str, float, int]:
    """('ok' | 'error' | 'FAIL', detail, seconds, peak RSS growth in bytes) of one case."""
    _, base, kind, arg = case
    work = tmp / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    target = _target(work, base, kind, arg, phantom)
    rss0, t0 = _rss(), time.perf_counter()
    try:
        vol = read_volume(target, workers=1, progress=False, max_voxels=FUZZ_MAX_VOXELS)
        assert vol.array.ndim == 3 and np.isfinite(vol.affine).all()
        outcome = ("ok", "")
    except MedfoundError as err:
        text = str(err)
        outcome = ("error", text) if "\n" not in text else ("FAIL", "multi-line: " + text)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - what the suite is looking for
        outcome = ("FAIL", f"{type(err).__name__}: {err}")
    elapsed, grown = time.perf_counter() - t0, _rss() - rss0
    if elapsed > CASE_SECONDS:
        outcome = ("FAIL", f"took {elapsed:.1f} s")
    if grown > CASE_RSS_BYTES:
        outcome = ("FAIL", f"peak RSS grew by {grown / 2**20:.0f} MiB")
    return (*outcome, elapsed, grown)


def _sweep(cases, tmp: Path, phantom: Path) -> Counter:
    counts: Counter = Counter()
    failures = []
    slowest = grown_most = 0.0
    for case in cases:
        status, detail, elapsed, grown = _run(case, tmp, phantom)
        slowest, grown_most = max(slowest, elapsed), max(grown_most, grown)
        counts[status] += 1
        if status == "FAIL":
            failures.append(f"{case[0]}: {detail[:300]}")
    counts["cases"] = len(cases)
    print(f"fuzz: {counts['cases']} cases, {counts['ok']} ok, {counts['error']} clean errors, "
          f"{counts['FAIL']} failures; slowest case {slowest:.2f} s, largest peak RSS growth "
          f"{grown_most / 2**20:.0f} MiB")
    assert not failures, "\n".join(failures)
    return counts


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory) -> Path:
    from medfound.data.phantoms import make_phantoms

    root = tmp_path_factory.mktemp("fuzz_phantom")
    make_phantoms(root, centers=1, cases=1, seed=3, size="small", progress=False)
    (folder,) = {p.parent for p in root.rglob("*.dcm")}
    return folder


def test_fuzz_sample_ends_in_a_volume_or_one_clean_error(tmp_path, phantom_ct):
    t0 = time.perf_counter()
    counts = _sweep(SAMPLE, tmp_path, phantom_ct)
    assert counts["cases"] == len(SAMPLE) >= 50
    assert counts["error"] > 0 and counts["ok"] > 0  # the mutations do reach the reader
    assert time.perf_counter() - t0 < 60


@pytest.mark.long
def test_fuzz_full_sweep_ends_in_a_volume_or_one_clean_error(tmp_path, phantom_ct):
    counts = _sweep(CASES, tmp_path, phantom_ct)
    assert counts["cases"] >= 300


def test_the_generator_mutates_what_it_says(tmp_path):
    _mutated_file(_base_path("CT_small.dcm"), tmp_path / "a.dcm", "field",
                  ("RescaleIntercept", "nan"))
    raw = pydicom.dcmread(tmp_path / "a.dcm", stop_before_pixels=True)["RescaleIntercept"]
    assert "nan" in str(raw.value).lower()
    _mutated_file(_base_path("CT_small.dcm"), tmp_path / "b.dcm", "cut", 0.5)
    assert (tmp_path / "b.dcm").stat().st_size == _base_path("CT_small.dcm").stat().st_size // 2



def test_the_data_card_survives_fuzzed_cases(tmp_path, phantom_ct):
    from medfound.data.card import data_card

    center = tmp_path / "center_fuzz"
    picked = [c for c in CASES if c[1] == PHANTOM][::9]
    for n, (_, _, kind, arg) in enumerate(picked):
        case = center / f"case_{n:03d}"
        target = _target(case, PHANTOM, kind, arg, phantom_ct)
        assert target.is_dir()
    card = data_card(center, progress=False)  # no exception but a MedfoundError per case
    assert card["cases"] == len(picked) >= 8
    assert sum(card["qc"]["counts"].values()) > 0
