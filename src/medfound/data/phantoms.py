"""Synthetic multi-center imaging studies ("phantoms") written as real DICOM.

`make_phantoms(out, centers, cases, seed, modalities, size)` writes:

    OUT/
      phantoms.json               what was generated (arguments, per-center case counts)
      center_0/
        center.json               the center's scanner profile (no PHI)
        annotations.csv           nodules, LUNA16 columns: seriesuid,coordX,coordY,coordZ,diameter_mm
                                  (then nodule_type, location)
        lookalikes.csv            in a world (make_world): hard negatives, not nodules
        datalist.json             MONAI-style {"training": [...], "validation": [...]}
        case_000/
          ct/IM00001.dcm ...      chest CT, one file per slice
          mr/...                  T1-weighted MR (with --modalities mr)
          pet/...                 FDG PET in Bq/ml (with pet)
          us/IM00001.dcm          one ultrasound multi-frame cine (with us)
          nodules.nii.gz          the CT's nodule mask (with masks=True / --masks)
        case_001/ ...
      center_1/ ...

Every modality of a case is its own study of the same fake patient. Coordinates in the CSV
and the datalist are DICOM patient coordinates (LPS, mm) of nodule centres, as LUNA16 uses;
datalist boxes are [x, y, z, w, h, d] (centre and size, mm, like MONAI's LUNA16 datalists),
image paths are relative to the center folder, the last quarter (rounded) of each center's
cases is "validation". Each entry also names the case, the CT SeriesInstanceUID, every modality's folder
and each nodule's type ("solid", "part-solid", "ground-glass"). Without CT there are no nodule annotations and no boxes.

Centers differ as real ones do: vendor and model, slice thickness (= spacing), pixel
spacing, noise, reconstruction kernel, HU calibration offset, value encoding (signed or
unsigned, intercept, padding outside the reconstruction circle), transfer syntax, file naming
and slice order, and size (one center has about a third of the cases). Each case carries fake
but realistic PHI (names, IDs, dates, institution, physicians, a private tag block) for the
de-identification stage to remove. Same seed → identical pixels, UIDs and annotations.

`make_world(out, preset="benchmark", seed)` (`medfound phantoms --preset benchmark`) writes a
whole network instead: six centers (one small), nodules from a LIDC/LUNA16-like distribution
(phantom_anatomy.NODULE_*), look-alikes, and a train / test split named in phantoms.json.

Sizes: "small" CT is 128×128 in-plane (2.7–3.5 mm pixels) with 2.5–3.5 mm slices (≈65–135
slices over a 220–330 mm scan); "full" is 512×512 (0.68–0.88 mm pixels) with 0.625–2.5 mm
slices (150–335 slices in the first three centers; ≈350–535 at 0.625 mm, ≈90–135 at 2.5 mm).
MR, PET and ultrasound have their own, coarser grids (see _MR_GRID, _PET_GRID, _US_SHAPE).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid
from tqdm.auto import tqdm

from medfound import __version__
from medfound.data.phantom_anatomy import Grid, Patient, nodule_mask, sample_patient
from medfound.data.phantom_images import ct_image, mr_image, pet_image, us_cine
from medfound.errors import MedfoundError
from medfound.io.nifti import RAS_TO_LPS
from medfound.io.write import write_multiframe, write_series

MODALITIES = ("ct", "mr", "pet", "us")
SIZES = ("small", "full")
F18_HALF_LIFE_S = 6586.2
LUNA16_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
# annotations.csv: the LUNA16 columns, then each nodule's type and location. Every reader of
# annotations (medfound.metrics.froc, data.luna16, data.card, LUNA16's own evaluation script)
# picks its columns by name, so the extra two ride along.
ANNOTATION_COLUMNS = [*LUNA16_COLUMNS, "nodule_type", "location"]
LOOKALIKES_FILE = "lookalikes.csv"  # per center of a world: the hard negatives, not nodules
LOOKALIKE_COLUMNS = [*LUNA16_COLUMNS, "kind"]
_MANIFEST = "phantoms.json"
MASK_FILE = "nodules.nii.gz"  # per case, with masks=True: the CT's nodule mask

# One scanner fleet per center; centers beyond five reuse a profile with new settings.
# thickness: (full, small) mm; fov: reconstruction diameter, mm; storage: (dtype, intercept).
PROFILES = [
    dict(vendor="SIEMENS", model="SOMATOM Definition AS", kernel="B31f", kernel_sigma_px=0.8,
         unsharp=0.0, noise_hu=12.0, thickness=(1.0, 2.75), fov=350.0, hu_offset=4.0,
         storage=("uint16", -1024.0), padding_hu=-1024.0, transfer_syntax="explicit",
         file_names="ordered", slice_order="head_first", kvp=120, fov_center="isocenter",
         z_origin=-150.0, table_y=135.0,
         mr=("SIEMENS", "MAGNETOM Skyra", 3.0, "axial"), pet=("SIEMENS", "Biograph mCT"),
         us=("SIEMENS", "ACUSON Sequoia")),
    dict(vendor="GE MEDICAL SYSTEMS", model="LightSpeed VCT", kernel="LUNG", kernel_sigma_px=0.0,
         unsharp=0.35, noise_hu=22.0, thickness=(1.25, 3.0), fov=380.0, hu_offset=-9.0,
         storage=("int16", -1024.0), padding_hu=-3024.0, transfer_syntax="implicit",
         file_names="random", slice_order="head_first", kvp=120, fov_center="patient",
         z_origin=20.0, table_y=125.0,
         mr=("GE MEDICAL SYSTEMS", "Optima MR450w", 1.5, "axial"),
         pet=("GE MEDICAL SYSTEMS", "Discovery MI"), us=("GE Healthcare", "LOGIQ E10")),
    dict(vendor="Philips", model="Brilliance 64", kernel="B", kernel_sigma_px=0.5,
         unsharp=0.0, noise_hu=16.0, thickness=(1.5, 3.25), fov=360.0, hu_offset=13.0,
         storage=("uint16", -1024.0), padding_hu=-1024.0, transfer_syntax="explicit",
         file_names="ordered", slice_order="feet_first", kvp=120, fov_center="isocenter",
         z_origin=60.0, table_y=140.0,
         mr=("Philips Medical Systems", "Ingenia", 3.0, "coronal"),
         pet=("Philips Medical Systems", "Vereos"), us=("Philips", "EPIQ 7")),
    dict(vendor="TOSHIBA", model="Aquilion ONE", kernel="FC52", kernel_sigma_px=0.0,
         unsharp=0.25, noise_hu=18.0, thickness=(0.625, 2.5), fov=400.0, hu_offset=-14.0,
         storage=("int16", 0.0), padding_hu=-2048.0, transfer_syntax="explicit",
         file_names="random", slice_order="head_first", kvp=120, fov_center="patient",
         z_origin=-350.0, table_y=120.0,
         mr=("TOSHIBA", "Vantage Titan", 1.5, "axial"), pet=("TOSHIBA", "Celesteion"),
         us=("TOSHIBA", "Aplio i800")),
    dict(vendor="UIH", model="uCT 760", kernel="B_SOFT_B", kernel_sigma_px=1.0, unsharp=0.0,
         noise_hu=10.0, thickness=(2.5, 3.5), fov=450.0, hu_offset=7.0,
         storage=("int16", -1024.0), padding_hu=-1024.0, transfer_syntax="rle",
         file_names="ordered", slice_order="feet_first", kvp=100, fov_center="isocenter",
         z_origin=150.0, table_y=130.0,
         mr=("UIH", "uMR 780", 3.0, "coronal"), pet=("UIH", "uMI 780"),
         us=("Mindray", "Resona 7")),
]
HOSPITALS = [
    ("Riverside General Hospital", "12 River Road, Springfield"),
    ("St. Aurelia Medical Center", "400 Cathedral Ave, Northport"),
    ("Northlake University Hospital", "1 Campus Drive, Northlake"),
    ("Eastbay Cancer Institute", "88 Harbor Street, Eastbay"),
    ("Hillcrest Regional Hospital", "7 Summit Lane, Hillcrest"),
    ("Lakeshore Community Hospital", "230 Shore Blvd, Lakeshore"),
    ("Westfield Teaching Hospital", "55 College Road, Westfield"),
    ("Pinecrest Medical Center", "9 Pine Avenue, Pinecrest"),
]
_SURNAMES = ["ZHANG", "WANG", "LI", "LIU", "CHEN", "YANG", "HUANG", "ZHAO", "WU", "ZHOU", "XU",
             "SUN", "MA", "ZHU", "HU", "GUO", "HE", "LIN", "GAO", "LUO", "SMITH", "JOHNSON",
             "MUELLER", "GARCIA", "ROSSI", "DUBOIS", "TANAKA", "KIM", "NGUYEN", "SILVA"]
_GIVEN = {"M": ["WEI", "JUN", "QIANG", "LEI", "YONG", "JIE", "TAO", "MING", "CHAO", "HAO", "JAMES",
                "LUCAS", "MARCO", "HIROSHI", "MINHO"],
          "F": ["FANG", "NA", "MIN", "JING", "LI", "YAN", "XIU", "LING", "HUI", "MEI", "MARIA",
                "EMMA", "SOFIA", "YUKI", "JIWOO"]}
_TRANSFER_SYNTAX = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian,
                    "rle": RLELossless}
_CT_GRID = {"small": 128, "full": 512}
# (matrix, field of view mm, slice spacing mm, slice thickness mm) per size.
_MR_GRID = {"small": (96, 384.0, 7.0, 6.0), "full": (320, 400.0, 6.0, 5.0)}
_PET_GRID = {"small": (96, 576.0, 5.0, 5.0), "full": (192, 700.0, 3.27, 3.27)}
_US_SHAPE = {"small": (12, 96, 128), "full": (40, 480, 640)}  # frames, rows, columns
_US_DEPTH_MM = 160.0


def make_phantoms(out, centers: int = 3, cases: int = 6, seed: int = 0,
                  modalities=("ct",), size: str = "small", progress: bool = True,
                  masks: bool = False) -> Path:
    """Write `centers` synthetic imaging centers under `out` (layout in the module docstring).

    cases: cases in the largest center; center c gets cases × (1, 1, ⅓, ⅔, ½)[c mod 5] (at
    least one), so the third center is the small one. modalities: any of "ct", "mr", "pet", "us",
    the same for every center (``"ct,mr"`` or ``("ct", "mr")``), or one mix per center
    (``"ct,pet;ct,mr;us,ct"`` or a list of lists; centers beyond the list cycle through it), as
    networks whose centers own different scanners have.
    masks: also write each CT's nodule mask (`case_NNN/nodules.nii.gz`, uint8 on the CT's
    grid; the datalist entry's "mask"), the ground truth of the segmentation task.
    size: "small" (fast, for tests) or "full" (512×512 CT). An existing `out` must be empty
    or an earlier phantom folder, which is replaced. Returns `out` as a Path.
    """
    out = Path(out)
    mixes = _check_args(out, centers, cases, seed, modalities, size)
    mods = tuple(m for m in MODALITIES if any(m in mix for mix in mixes))
    if (out / _MANIFEST).exists():
        for old in out.glob("center_*"):
            shutil.rmtree(old)
    out.mkdir(parents=True, exist_ok=True)
    sizes = center_sizes(centers, cases)
    manifest = dict(generator="medfound.data.phantoms", version=__version__, seed=seed,
                    centers=centers, cases=cases, modalities=list(mods), size=size,
                    center_cases=sizes,
                    center_modalities=[list(mixes[c % len(mixes)]) for c in range(centers)],
                    masks=bool(masks),
                    complete=False)
    _write_json(out / _MANIFEST, manifest)
    with tqdm(total=sum(sizes), desc="phantom cases", unit="case", disable=not progress) as bar:
        for c, n_cases in enumerate(sizes):
            _make_center(out / f"center_{c}", c, n_cases, seed, mixes[c % len(mixes)], size, bar,
                         masks)
    manifest["complete"] = True
    _write_json(out / _MANIFEST, manifest)
    return out


# --- worlds: a network of centers with its own train / test split ---------------------------

# A low-dose screening scanner the training centers lack: a sixth vendor, sharp kernel, the
# highest noise of the network, the narrowest field of view (cuts off large patients).
_SCREENING_PROFILE = dict(
    vendor="Canon Medical Systems", model="Aquilion Prime SP", kernel="FC51", kernel_sigma_px=0.0,
    unsharp=0.3, noise_hu=26.0, thickness=(1.0, 2.75), fov=340.0, hu_offset=10.0,
    storage=("int16", -1024.0), padding_hu=-2000.0, transfer_syntax="explicit",
    file_names="ordered", slice_order="feet_first", kvp=100, fov_center="patient",
    z_origin=-60.0, table_y=128.0,
    mr=("Canon Medical Systems", "Vantage Orian", 1.5, "axial"),
    pet=("Canon Medical Systems", "Cartesion Prime"), us=("Canon Medical Systems", "Aplio i700"))
# preset → centers (scanner profile: an index of PROFILES or a profile; cases; role) and
# per-scan counts. The test centers hold 76 scans and 174 nodules: at a sensitivity of 0.85 the
# binomial 95 % interval is ±0.053, so a CPM there is known to about ±0.06. LUNA16 has 1.3
# nodules a scan; 2.3 here buys that precision in fewer scans (generation time).
# Test centers: a sharp-kernel scanner inside the training range of pixel size and noise (the
# TOSHIBA) and the screening scanner outside it. The training centers span the finest and the
# coarsest grids (SIEMENS 2.7 mm pixels, UIH 3.5 mm pixels and slices); center_2 is the small one.
WORLDS = {
    "benchmark": {
        "centers": [
            {"profile": 0, "cases": 40, "role": "train"},
            {"profile": 1, "cases": 40, "role": "train"},
            {"profile": 2, "cases": 10, "role": "train"},
            {"profile": 4, "cases": 34, "role": "train"},
            {"profile": 3, "cases": 38, "role": "test"},
            {"profile": _SCREENING_PROFILE, "cases": 38, "role": "test"},
        ],
        "nodules_per_scan": 2.3,
        # Scans with 0–5 nodules (mean ≈ 2.2 before the center's total is made exact).
        "nodule_count_p": [0.10, 0.22, 0.28, 0.22, 0.12, 0.06],
        "lookalikes_per_scan": (1, 5),  # uniform, inclusive
        "size": "small",
    },
}
PRESETS = tuple(WORLDS)
_WORLD_KEY = 1000  # world case keys are [seed, 1000 + center, case]: other patients and UIDs
# than the classic phantoms of the same seed


def world_plan(preset: str = "benchmark", seed: int = 0, scale: float = 1.0) -> list[dict]:
    """Per center of a world: name, role, scanner profile, and the nodule and look-alike count
    of each scan (deterministic for the seed). `scale` multiplies the case counts (at least two
    cases a training center, one a test center) for quick worlds, tests among them."""
    spec = _world_spec(preset)
    plan = []
    for c, center in enumerate(spec["centers"]):
        base = center["profile"]
        prof = dict(PROFILES[base] if isinstance(base, int) else base)
        prof["institution"], prof["address"] = HOSPITALS[c % len(HOSPITALS)]
        minimum = 2 if center["role"] == "train" else 1
        n = max(minimum, int(round(center["cases"] * scale)))
        rng = np.random.default_rng([seed, _WORLD_KEY + c, 77])
        p = np.asarray(spec["nodule_count_p"])
        counts = rng.choice(len(p), size=n, p=p)
        total = int(round(spec["nodules_per_scan"] * n))
        while counts.sum() != total:  # make the center's total exact, one scan at a time
            i = int(rng.integers(n))
            if counts.sum() < total and counts[i] < len(p) - 1:
                counts[i] += 1
            elif counts.sum() > total and counts[i] > 0:
                counts[i] -= 1
        lo, hi = spec["lookalikes_per_scan"]
        plan.append({"center": f"center_{c}", "role": center["role"], "profile": prof,
                     "nodules": [int(k) for k in counts],
                     "lookalikes": [int(k) for k in rng.integers(lo, hi + 1, size=n)]})
    return plan


def _world_spec(preset: str) -> dict:
    if preset not in WORLDS:
        raise MedfoundError(f"unknown phantom preset {preset!r}",
                            hint=f"use --preset {' or '.join(PRESETS)}")
    return WORLDS[preset]


def make_world(out, preset: str = "benchmark", seed: int = 0, scale: float = 1.0,
               workers: int | None = None, progress: bool = True, masks: bool = False) -> Path:
    """Write the world `preset` (see WORLDS) under `out`: the layout of `make_phantoms`, plus
    each center's lookalikes.csv (hard negatives: vessel branchings, calcified granulomas, scars
    — not nodules, so a finding on one is a false positive), and its split in phantoms.json:
    "train_centers" (each with a validation split in its datalist, for checkpoint selection)
    and "test_centers" (held out: training on them is refused, see
    medfound.train.detection.check_world_split). Nodules follow phantom_anatomy's
    LIDC/LUNA16-like NODULE_* distributions. `scale`: see `world_plan`. workers: processes
    (default: up to 4, at most the CPUs; 1 = in this process); the files do not depend on it.
    Same seed → identical files."""
    out = Path(out)
    spec = _world_spec(preset)
    if not isinstance(scale, (int, float)) or not 0 < scale <= 4:
        raise MedfoundError(f"scale must be a number in (0, 4], got {scale!r}")
    size, mods = spec["size"], ("ct",)
    _check_args(out, len(spec["centers"]), 1, seed, mods, size)
    plan = world_plan(preset, seed, scale)
    if (out / _MANIFEST).exists():
        for old in out.glob("center_*"):
            shutil.rmtree(old)
    out.mkdir(parents=True, exist_ok=True)
    role = {r: [c["center"] for c in plan if c["role"] == r] for r in ("train", "test")}
    cases = [len(c["nodules"]) for c in plan]
    manifest = dict(
        generator="medfound.data.phantoms", version=__version__, preset=preset, seed=seed,
        scale=scale, centers=len(plan), modalities=list(mods), size=size, masks=bool(masks),
        train_centers=role["train"], test_centers=role["test"],
        small_center=plan[int(np.argmin(cases))]["center"], center_cases=cases,
        center_nodules=[sum(c["nodules"]) for c in plan],
        center_lookalikes=[sum(c["lookalikes"]) for c in plan],
        scanners={c["center"]: {"manufacturer": c["profile"]["vendor"],
                                "model": c["profile"]["model"], "kernel": c["profile"]["kernel"],
                                "scanner_slice_thickness_mm": c["profile"]["thickness"][0],
                                "slice_thickness_mm": c["profile"]["thickness"][1],
                                "pixel_spacing_mm": c["profile"]["fov"] / _CT_GRID[size],
                                "noise_hu": c["profile"]["noise_hu"],
                                "hu_offset": c["profile"]["hu_offset"]} for c in plan},
        complete=False)
    _write_json(out / _MANIFEST, manifest)
    jobs = [(out / c["center"] / f"case_{n:03d}", c["profile"], [seed, _WORLD_KEY + i, n], mods,
             size, masks, c["nodules"][n], c["lookalikes"][n])
            for i, c in enumerate(plan) for n in range(len(c["nodules"]))]
    for c in plan:
        (out / c["center"]).mkdir()
    workers = min(4, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    with tqdm(total=len(jobs), desc="world cases", unit="case", disable=not progress) as bar, \
            _pool(workers) as pool:
        results = []
        for result in (pool.map(_world_case, jobs, chunksize=1) if pool else map(_world_case, jobs)):
            results.append(result)
            bar.update(1)
    start = 0
    for i, (c, n) in enumerate(zip(plan, cases, strict=True)):
        mine = results[start:start + n]
        _write_center_files(out / c["center"], c["profile"], mine, mods, size, lookalikes=True)
        # What was placed (a nodule that found no place is dropped; see place_luna_nodules).
        manifest["center_nodules"][i] = sum(len(rows) for _, rows, _ in mine)
        manifest["center_lookalikes"][i] = sum(len(fakes) for _, _, fakes in mine)
        start += n
    manifest["complete"] = True
    _write_json(out / _MANIFEST, manifest)
    return out


def _world_case(job: tuple):
    return _make_case(*job)


@contextlib.contextmanager
def _pool(workers: int):
    """A process pool of `workers` (spawned: safe beside torch's threads), or None for one."""
    if workers <= 1:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def read_world(root) -> dict | None:
    """The split a world's phantoms.json names ({"preset", "seed", "train_centers",
    "test_centers"}), or None when `root` holds no phantoms.json or one without a split."""
    path = Path(root) / _MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MedfoundError(f"cannot read the phantom manifest ({err})", path=path,
                            hint="regenerate it with `medfound phantoms`") from None
    if not isinstance(manifest, dict) or "test_centers" not in manifest:
        return None
    split = {k: manifest.get(k) for k in ("preset", "seed", "train_centers", "test_centers")}
    for key in ("train_centers", "test_centers"):
        if not (isinstance(split[key], list) and all(isinstance(c, str) for c in split[key])):
            raise MedfoundError(f"'{key}' must be a list of center names", path=path,
                                hint="regenerate it with `medfound phantoms --preset benchmark`")
    return split


def scramble_training_boxes(center, seed: int = 0) -> int:
    """Move every training nodule box of the phantom center folder `center` to a random place
    inside its scan (sizes kept): a center whose labels mark no nodule and leave its real
    nodules unlabelled, as a badly annotated or hostile center would. Rewrites the center's
    datalist.json only; returns the number of boxes moved."""
    from medfound.io.reader import read_volume

    rng = np.random.default_rng(seed)
    path = Path(center) / "datalist.json"
    datalist = json.loads(path.read_text())
    moved = 0
    for item in datalist["training"]:
        volume = read_volume(Path(center) / item["image"])
        shape = np.array(volume.array.shape)
        boxes = []
        for box in item["box"]:
            ijk = rng.uniform(0.25, 0.75, size=3) * (shape - 1)
            boxes.append([*map(float, (volume.affine @ np.r_[ijk, 1.0])[:3]), *box[3:]])
        item["box"] = boxes
        moved += len(boxes)
    _write_json(path, datalist)
    return moved


def center_sizes(centers: int, cases: int) -> list[int]:
    """Cases per center: the largest has `cases`; center 2 (the small one) about a third."""
    factors = [1.0, 1.0, 1 / 3, 2 / 3, 0.5]
    return [cases if c == 0 else max(1, int(cases * factors[c % 5])) for c in range(centers)]


def center_profile(seed: int, c: int) -> dict:
    """Scanner profile of center c: one of PROFILES, varied for c ≥ len(PROFILES)."""
    prof = dict(PROFILES[c % len(PROFILES)])
    if c >= len(PROFILES):
        rng = np.random.default_rng([seed, c, 999])
        full = float(rng.choice([0.625, 1.0, 1.25, 1.5, 2.0, 2.5]))
        prof.update(thickness=(full, round(2.25 + 0.5 * full, 2)),
                    noise_hu=round(prof["noise_hu"] * float(rng.uniform(0.8, 1.25)), 1),
                    hu_offset=round(float(rng.uniform(-15, 15)), 1))
    prof["institution"], prof["address"] = HOSPITALS[c % len(HOSPITALS)]
    if c >= len(HOSPITALS):
        prof["institution"] += f" {c // len(HOSPITALS) + 1}"
    return prof


# --- one center --------------------------------------------------------------------------


def _make_center(cdir: Path, c: int, n_cases: int, seed: int, mods, size: str, bar,
                 masks: bool = False) -> None:
    prof = center_profile(seed, c)
    cdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in range(n_cases):
        results.append(_make_case(cdir / f"case_{n:03d}", prof, [seed, c, n], mods, size, masks))
        bar.update(1)
    _write_center_files(cdir, prof, results, mods, size)


def _write_center_files(cdir: Path, prof: dict, results: list, mods, size: str,
                        lookalikes: bool = False) -> None:
    """datalist.json, annotations.csv (and lookalikes.csv) and center.json of a center from its
    cases' `_make_case` results, in case order."""
    entries = [{**entry, "case": f"case_{n:03d}"} for n, (entry, _, _) in enumerate(results)]
    n_cases = len(entries)
    n_val = int(0.25 * n_cases + 0.5)  # the last quarter, rounded: 0 of 1, 1 of 2–5, 2 of 6–9
    datalist = {"training": entries[:n_cases - n_val], "validation": entries[n_cases - n_val:]}
    _write_json(cdir / "datalist.json", datalist)
    tables = [("annotations.csv", ANNOTATION_COLUMNS, 1)]
    if lookalikes:
        tables.append((LOOKALIKES_FILE, LOOKALIKE_COLUMNS, 2))
    for name, columns, part in tables:
        with open(cdir / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for result in results:
                w.writerows(result[part])
    _write_json(cdir / "center.json", _center_card(cdir.name, prof, n_cases, mods, size))


def _center_card(name: str, prof: dict, n_cases: int, mods, size: str) -> dict:
    """center.json: the scanner settings a center's phantoms were made with (no PHI).
    Top-level keys describe the CT scanner; other modalities get one object each."""
    t = prof["thickness"][0 if size == "full" else 1]
    card = {
        "center": name, "cases": n_cases, "modalities": list(mods), "size": size,
        "manufacturer": prof["vendor"], "model": prof["model"], "slice_thickness_mm": t,
        "spacing_between_slices_mm": t, "pixel_spacing_mm": prof["fov"] / _CT_GRID[size],
        "matrix": _CT_GRID[size], "reconstruction_diameter_mm": prof["fov"],
        "kernel": prof["kernel"], "kernel_blur_px": prof["kernel_sigma_px"],
        "kernel_unsharp": prof["unsharp"], "noise_hu": prof["noise_hu"],
        "hu_offset": prof["hu_offset"], "kvp": prof["kvp"], "stored_dtype": prof["storage"][0],
        "rescale_intercept": prof["storage"][1], "padding_hu": prof["padding_hu"],
        "transfer_syntax": prof["transfer_syntax"], "file_names": prof["file_names"],
        "slice_order": prof["slice_order"],
    }
    if "mr" in mods:
        n, fov, spacing, thickness = _MR_GRID[size]
        card["mr"] = {"manufacturer": prof["mr"][0], "model": prof["mr"][1],
                      "field_strength_t": prof["mr"][2], "plane": prof["mr"][3],
                      "matrix": n, "pixel_spacing_mm": fov / n, "slice_thickness_mm": thickness,
                      "spacing_between_slices_mm": spacing}
    if "pet" in mods:
        n, fov, spacing, _ = _PET_GRID[size]
        card["pet"] = {"manufacturer": prof["pet"][0], "model": prof["pet"][1], "matrix": n,
                       "pixel_spacing_mm": fov / n, "slice_thickness_mm": spacing,
                       "units": "BQML", "psf_fwhm_mm": 6.5}
    if "us" in mods:
        nf, nj, ni = _US_SHAPE[size]
        card["us"] = {"manufacturer": prof["us"][0], "model": prof["us"][1], "frames": nf,
                      "rows": nj, "columns": ni, "pixel_spacing_mm": _US_DEPTH_MM / nj}
    return card


def _make_case(cdir: Path, prof: dict, key: list[int], mods, size: str, masks: bool = False,
               n_nodules: int | None = None, lookalikes: int = 0):
    """Write one case's series; return its datalist entry, its annotation rows and its
    look-alike rows. n_nodules / lookalikes: see `sample_patient` (None, 0: classic phantoms)."""
    pat = sample_patient(key, z_origin=prof["z_origin"], table_y=prof["table_y"],
                         min_vessel_radius=0.5 if size == "full" else 1.0, nodules=True,
                         n_nodules=n_nodules, lookalikes=lookalikes)
    phi = _fake_phi(key, pat, prof)
    entry: dict = {}
    rows, fakes = [], []
    for m in mods:
        folder = cdir / m
        if m == "ct":
            mask = cdir / MASK_FILE if masks else None
            uid = _write_ct(folder, pat, prof, phi, key, size, mask_path=mask)
            entry["image"] = f"{cdir.name}/ct"
            if mask is not None:
                entry["mask"] = f"{cdir.name}/{MASK_FILE}"
            entry["box"] = [[*map(float, nd.center), nd.diameter_mm, nd.diameter_mm, nd.diameter_mm]
                            for nd in pat.nodules]
            entry["label"] = [0] * len(pat.nodules)
            entry["nodule_type"] = [nd.kind for nd in pat.nodules]
            entry["nodule_location"] = [nd.location for nd in pat.nodules]
            entry["seriesuid"] = uid
            rows += [[uid, *(f"{v:.2f}" for v in nd.center), f"{nd.diameter_mm:.1f}", nd.kind,
                      nd.location] for nd in pat.nodules]
            fakes += [[uid, *(f"{v:.2f}" for v in la.center), f"{la.diameter_mm:.1f}", la.kind]
                      for la in pat.lookalikes]
        elif m == "mr":
            _write_mr(folder, pat, prof, phi, key, size)
        elif m == "pet":
            _write_pet(folder, pat, prof, phi, key, size)
        else:
            _write_us(folder, prof, phi, key, size)
        entry.setdefault("image", f"{cdir.name}/{m}")
        entry[m] = f"{cdir.name}/{m}"
    return entry, rows, fakes


def _write_mask(path: Path, mask_kji: np.ndarray, affine: np.ndarray) -> None:
    """A (k, j, i) label array as NIfTI on the grid `affine` ((i, j, k) → LPS mm) describes."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(mask_kji.T), RAS_TO_LPS @ affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _uid(key: list[int], *parts: str) -> str:
    return generate_uid(entropy_srcs=["medfound-phantom", *map(str, key), *parts])


# --- modalities --------------------------------------------------------------------------


def _write_ct(folder: Path, pat: Patient, prof: dict, phi: dict, key, size: str,
              mask_path: Path | None = None) -> str:
    n = _CT_GRID[size]
    t = prof["thickness"][0 if size == "full" else 1]
    ps = prof["fov"] / n
    if prof["fov_center"] == "patient":
        cx, cy = round(pat.x0), round(pat.y0 + 0.1 * pat.b)
    else:
        cx, cy = 0.0, 0.0
    z_bot, z_top = pat.scan
    nk = int(np.ceil((z_top - z_bot) / t)) + 1
    z_top = round(z_top, 2)
    if prof["slice_order"] == "head_first":
        z0, dz = z_top, -t
    else:
        z0, dz = z_top - (nk - 1) * t, t
    affine = np.array([[ps, 0, 0, round(cx - prof["fov"] / 2 + ps / 2, 4)],
                       [0, ps, 0, round(cy - prof["fov"] / 2 + ps / 2, 4)],
                       [0, 0, dz, round(z0, 4)], [0, 0, 0, 1.0]])
    grid = Grid((n, n, nk), affine)
    hu = ct_image(pat, grid, prof, key)
    if mask_path is not None:
        _write_mask(mask_path, nodule_mask(pat, grid), affine)
    dtype, intercept = prof["storage"]
    study = phi["studies"]["ct"]
    series_uid = _uid(key, "ct", "series")
    attrs = {
        **phi["patient"], **phi["site"], **study, **_series_time(study),
        "Manufacturer": prof["vendor"], "ManufacturerModelName": prof["model"],
        "StudyDescription": "CT CHEST W/O CONTRAST", "SeriesDescription": f"Lung {t:g} {prof['kernel']}",
        "ProtocolName": "Chest routine", "BodyPartExamined": "CHEST", "PatientPosition": "HFS",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "SeriesNumber": 2,
        "KVP": prof["kvp"], "XRayTubeCurrent": int(180 * (pat.a / 150) ** 2),
        "ExposureTime": 500, "ConvolutionKernel": prof["kernel"],
        "ReconstructionDiameter": prof["fov"], "DataCollectionDiameter": 500.0,
        "GantryDetectorTilt": 0.0, "TableHeight": round(260.0 - pat.table_y, 1),
        "RotationDirection": "CW", "SpiralPitchFactor": 0.9,
        "WindowCenter": [-600, 40], "WindowWidth": [1500, 400],
        "PatientWeight": pat.weight_kg, "PatientSize": pat.height_m,
    }
    if prof["padding_hu"] < -1024:  # vendors that pad outside the circle say so
        pad = int(round(prof["padding_hu"] - intercept))
        attrs[0x00280120] = ("SS" if dtype == "int16" else "US", pad)
    write_series(hu.T, affine, folder, "CT", attrs, rescale=(1.0, intercept), dtype=dtype,
                 study_uid=_uid(key, "ct", "study"), series_uid=series_uid,
                 frame_of_reference_uid=_uid(key, "ct", "for"),
                 transfer_syntax=_TRANSFER_SYNTAX[prof["transfer_syntax"]],
                 file_names=prof["file_names"])
    return series_uid


def _write_mr(folder: Path, pat: Patient, prof: dict, phi: dict, key, size: str) -> None:
    n, fov, spacing, thickness = _MR_GRID[size]
    ps = fov / n
    vendor, model, tesla, plane = prof["mr"]
    zc = round(0.5 * (pat.scan[0] + pat.scan[1]), 1)
    if plane == "axial":  # i → L, j → P, k → S (feet to head)
        nk = int(np.ceil((pat.scan[1] - pat.scan[0]) / spacing))
        affine = np.array([[ps, 0, 0, -fov / 2 + ps / 2], [0, ps, 0, round(pat.y0 - fov / 2 + ps / 2, 2)],
                           [0, 0, spacing, round(zc - (nk - 1) * spacing / 2, 2)], [0, 0, 0, 1.0]])
    else:  # coronal: i → L, j → I (rows run head to feet), k → P
        y_lo, y_hi = pat.y0 - pat.b - 10, pat.y0 + pat.b + 10
        nk = int(np.ceil((y_hi - y_lo) / spacing))
        affine = np.array([[ps, 0, 0, -fov / 2 + ps / 2], [0, 0, spacing, round(y_lo, 2)],
                           [0, -ps, 0, round(zc + fov / 2 - ps / 2, 2)], [0, 0, 0, 1.0]])
    grid = Grid((n, n, nk), affine)
    img = mr_image(pat, grid, key)
    study = phi["studies"]["mr"]
    attrs = {
        **phi["patient"], **phi["site"], **study, **_series_time(study),
        "Manufacturer": vendor, "ManufacturerModelName": model,
        "StudyDescription": "MR CHEST", "SeriesDescription": f"t1_tse_{plane[:3]}",
        "ProtocolName": f"T1 TSE {plane}", "BodyPartExamined": "CHEST", "PatientPosition": "HFS",
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"], "SeriesNumber": 3,
        "SliceThickness": thickness, "MagneticFieldStrength": tesla,
        "ImagingFrequency": round(42.577 * tesla, 4), "ImagedNucleus": "1H",
        "ScanningSequence": "SE", "SequenceVariant": ["SK", "OSP"], "ScanOptions": "",
        "MRAcquisitionType": "2D", "RepetitionTime": 550.0, "EchoTime": 9.8, "FlipAngle": 90.0,
        "EchoTrainLength": 3, "NumberOfAverages": 1.0, "PixelBandwidth": 200.0,
        "ReceiveCoilName": "Body", "SequenceName": "*tse2d1_3",
        "PatientWeight": pat.weight_kg, "PatientSize": pat.height_m,
    }
    write_series(img.T, affine, folder, "MR", attrs, dtype="uint16",
                 study_uid=_uid(key, "mr", "study"), series_uid=_uid(key, "mr", "series"),
                 frame_of_reference_uid=_uid(key, "mr", "for"), file_names=prof["file_names"])


def _write_pet(folder: Path, pat: Patient, prof: dict, phi: dict, key, size: str) -> None:
    n, fov, t, _ = _PET_GRID[size]
    ps = fov / n
    nk = int(np.ceil((pat.scan[1] - pat.scan[0]) / t)) + 1
    affine = np.array([[ps, 0, 0, -fov / 2 + ps / 2], [0, ps, 0, -fov / 2 + ps / 2],
                       [0, 0, -t, round(pat.scan[1], 2)], [0, 0, 0, 1.0]])
    grid = Grid((n, n, nk), affine)
    suv = pet_image(pat, grid, key)
    rng = np.random.default_rng([*key, 31])
    dose = round(float(rng.uniform(0.85, 1.15)) * 3.7e8, -5)  # Bq injected
    study = phi["studies"]["pet"]
    injected = datetime.strptime(study["StudyDate"] + study["StudyTime"][:6], "%Y%m%d%H%M%S")
    wait_s = float(rng.uniform(55, 75)) * 60
    start = injected + timedelta(seconds=round(wait_s))
    # Images are decay-corrected to the series start (DecayCorrection START), so
    # SUVbw = value · weight / (dose · 2^(−(SeriesTime − injection) / half-life)).
    decayed = dose * 2.0 ** (-(start - injected).total_seconds() / F18_HALF_LIFE_S)
    bqml = suv * np.float32(decayed / (pat.weight_kg * 1000.0))
    attrs = {
        **phi["patient"], **phi["site"], **study,
        "SeriesDate": start.strftime("%Y%m%d"), "SeriesTime": start.strftime("%H%M%S.00"),
        "AcquisitionDate": start.strftime("%Y%m%d"), "AcquisitionTime": start.strftime("%H%M%S.00"),
        "ContentDate": start.strftime("%Y%m%d"), "ContentTime": start.strftime("%H%M%S.00"),
        "Manufacturer": prof["pet"][0], "ManufacturerModelName": prof["pet"][1],
        "StudyDescription": "PET CT WHOLE BODY FDG", "SeriesDescription": "PET AC",
        "BodyPartExamined": "CHEST", "SeriesNumber": 4,
        "ImageType": ["ORIGINAL", "PRIMARY"],
        "SeriesType": ["WHOLE BODY", "IMAGE"], "Units": "BQML", "CountsSource": "EMISSION",
        "DecayCorrection": "START", "CorrectedImage": ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"],
        "ReconstructionMethod": "OSEM 3i21s", "NumberOfSlices": nk, "FrameReferenceTime": 0.0,
        "ActualFrameDuration": 120000, "DecayFactor": 1.0, "SliceSensitivityFactor": 1.0,
        "PatientWeight": pat.weight_kg, "PatientSize": pat.height_m,
        "RadiopharmaceuticalInformationSequence": [{
            "Radiopharmaceutical": "Fluorodeoxyglucose",
            "RadiopharmaceuticalStartTime": injected.strftime("%H%M%S.00"),
            "RadiopharmaceuticalStartDateTime": injected.strftime("%Y%m%d%H%M%S.00"),
            "RadionuclideTotalDose": dose, "RadionuclideHalfLife": F18_HALF_LIFE_S,
            "RadionuclidePositronFraction": 0.9673,
            "RadionuclideCodeSequence": [_code("77004003", "^18^Fluorine")],  # CID 4020
            "RadiopharmaceuticalCodeSequence": [_code("35321007", "Fluorodeoxyglucose F^18^")],  # CID 4021
        }],
        # A 3D scanner without septa; the patient lies supine, head first into the gantry. PET
        # says so with these codes instead of PatientPosition, which may not be sent beside
        # PatientOrientationCodeSequence (PS3.3 C.7.3.1).
        "CollimatorType": "NONE",
        "PatientOrientationCodeSequence": [{  # CID 19, its modifier CID 20
            **_code("102538003", "recumbent"),
            "PatientOrientationModifierCodeSequence": [_code("40199007", "supine")]}],
        "PatientGantryRelationshipCodeSequence": [_code("102540008", "headfirst")],  # CID 21
    }
    write_series(bqml.T, affine, folder, "PT", attrs, rescale="per_slice", dtype="int16",
                 study_uid=_uid(key, "pet", "study"), series_uid=_uid(key, "pet", "series"),
                 frame_of_reference_uid=_uid(key, "pet", "for"), file_names=prof["file_names"])


def _code(value: str, meaning: str) -> dict:
    """A SNOMED CT code sequence item (designator SCT; SRT is retired, PS3.16 8.2)."""
    return {"CodeValue": value, "CodingSchemeDesignator": "SCT", "CodeMeaning": meaning}


def _write_us(folder: Path, prof: dict, phi: dict, key, size: str) -> None:
    nf, nj, ni = _US_SHAPE[size]
    spacing = _US_DEPTH_MM / nj
    frames = us_cine(key, (nf, nj, ni), spacing)
    study = phi["studies"]["us"]
    attrs = {
        **phi["patient"], **phi["site"], **study, **_series_time(study),
        "Manufacturer": prof["us"][0], "ManufacturerModelName": prof["us"][1],
        "StudyDescription": "US ABDOMEN", "SeriesDescription": "Liver cine",
        "BodyPartExamined": "ABDOMEN", "SeriesNumber": 5, "BurnedInAnnotation": "YES",
        "TransducerData": ["C5-1", "", ""], "LossyImageCompression": "00",
    }
    write_multiframe(frames.T, folder / "IM00001.dcm", attrs, spacing_mm=(spacing, spacing),
                     frame_time_ms=40.0, study_uid=_uid(key, "us", "study"),
                     series_uid=_uid(key, "us", "series"))


# --- fake PHI ----------------------------------------------------------------------------


def _fake_phi(key: list[int], pat: Patient, prof: dict) -> dict:
    """Identifying attributes for one case: same patient in every modality, one study each."""
    rng = np.random.default_rng([*key, 50])
    surname = str(rng.choice(_SURNAMES))
    given = str(rng.choice(_GIVEN[pat.sex]))
    ct_day = date(2016, 1, 1) + timedelta(days=int(rng.integers(0, 9 * 365)))
    birth = date(ct_day.year - pat.age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    age = ct_day.year - birth.year - ((ct_day.month, ct_day.day) < (birth.month, birth.day))
    patient_id = f"P{int(rng.integers(1_000_000, 9_999_999))}"
    doctors = [f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN['M'] + _GIVEN['F'])}" for _ in range(3)]
    patient = {
        "PatientName": f"{surname}^{given}", "PatientID": patient_id,
        "PatientBirthDate": birth.strftime("%Y%m%d"), "PatientSex": pat.sex,
        "PatientAge": f"{age:03d}Y",
        "OtherPatientIDs": f"MRN{int(rng.integers(100_000, 999_999))}",
        "PatientAddress": f"{int(rng.integers(1, 300))} {rng.choice(['Oak', 'Maple', 'Elm', 'Cedar'])} Street",
        # A private block, as vendors and hospital systems add: de-identification must drop it.
        0x00110010: ("LO", "MEDFOUND PHANTOM PHI"),
        0x00111001: ("LO", f"HIS-{int(rng.integers(100_000, 999_999))}"),
        0x00111002: ("PN", f"{surname}^{given}"),
        0x00111003: ("DA", birth.strftime("%Y%m%d")),
    }
    site = {
        "InstitutionName": prof["institution"], "InstitutionAddress": prof["address"],
        "InstitutionalDepartmentName": "Radiology", "StationName": f"{prof['model'][:8].upper().replace(' ', '')}01",
        "DeviceSerialNumber": str(int(rng.integers(10_000, 99_999))),
        "ReferringPhysicianName": doctors[0], "PerformingPhysicianName": doctors[1],
        "OperatorsName": doctors[2],
    }
    studies = {}
    for i, m in enumerate(MODALITIES):
        day = ct_day + timedelta(days=0 if m == "ct" else int(rng.integers(1, 60)))
        t = int(rng.integers(8 * 3600, 17 * 3600))
        studies[m] = {"StudyDate": day.strftime("%Y%m%d"),
                      "StudyTime": f"{t // 3600:02d}{t // 60 % 60:02d}{t % 60:02d}.00",
                      "AccessionNumber": f"A{int(rng.integers(10_000_000, 99_999_999))}",
                      "StudyID": str(int(rng.integers(1000, 9999)) + i)}
    return {"patient": patient, "site": site, "studies": studies}


def _series_time(study: dict) -> dict:
    """Series, acquisition and content date/time a few minutes after the study started."""
    t = datetime.strptime(study["StudyDate"] + study["StudyTime"][:6], "%Y%m%d%H%M%S")
    t += timedelta(minutes=4)
    d, hms = t.strftime("%Y%m%d"), t.strftime("%H%M%S.00")
    return {"SeriesDate": d, "SeriesTime": hms, "AcquisitionDate": d, "AcquisitionTime": hms,
            "ContentDate": d, "ContentTime": hms}


# --- arguments and files -----------------------------------------------------------------


def _check_args(out: Path, centers, cases, seed, modalities, size) -> list[tuple[str, ...]]:
    if not isinstance(centers, int) or centers < 1:
        raise MedfoundError(f"centers must be a whole number ≥ 1, got {centers!r}",
                            hint="pass --centers 3 (for example)")
    if not isinstance(cases, int) or cases < 1:
        raise MedfoundError(f"cases must be a whole number ≥ 1, got {cases!r}",
                            hint="pass --cases 6 (for example)")
    if not isinstance(seed, int) or seed < 0:
        raise MedfoundError(f"seed must be a whole number ≥ 0, got {seed!r}", hint="pass --seed 0")
    if isinstance(modalities, str):
        mixes = [part.split(",") for part in modalities.split(";")]
    elif modalities and all(isinstance(m, str) for m in modalities):
        mixes = [list(modalities)]
    else:
        mixes = [[m] if isinstance(m, str) else list(m) for m in (modalities or [])]
    mixes = [[str(m).strip().lower() for m in mix if str(m).strip()] for mix in mixes] or [[]]
    for mix in mixes:
        unknown = [m for m in mix if m not in MODALITIES]
        if unknown or not mix:
            raise MedfoundError(f"unknown modality {', '.join(unknown) or '(none given)'}",
                                hint=f"use a comma list of {','.join(MODALITIES)}, or one such "
                                     "list per center separated by ';' (ct,pet;ct,mr;us,ct)")
    if size not in SIZES:
        raise MedfoundError(f"size must be small or full, got {size!r}", hint="pass --size small")
    if out.exists() and not out.is_dir():
        raise MedfoundError("exists and is not a folder", path=out,
                            hint="choose a new --out folder")
    if out.is_dir() and any(out.iterdir()) and not (out / _MANIFEST).exists():
        raise MedfoundError("folder is not empty and holds no phantoms", path=out,
                            hint="choose an empty or new --out folder (phantom folders are replaced)")
    return [tuple(m for m in MODALITIES if m in mix) for mix in mixes]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
