"""`medfound inspect`, `medfound deid` and `medfound phantoms`: read a study, de-identify
DICOM files, generate synthetic centers."""

from __future__ import annotations

import json
from pathlib import Path

from medfound.cli.common import add_max_voxels, print_json, warn
from medfound.errors import MedfoundError


def cmd_inspect(args) -> int:
    from medfound.io.reader import MultipleSeriesError, read_volume

    try:
        vol = read_volume(args.path, series_uid=args.series, allow_gaps=args.allow_gaps,
                          workers=args.workers)
    except MultipleSeriesError as err:
        if args.json:
            print_json({"path": str(args.path), "series": [s.as_dict() for s in err.series]})
        else:
            print(f"{args.path}: {len(err.series)} series; choose one with --series UID")
            print(f"{'series_uid':<66} {'modality':<8} {'count':>6}  description")
            for s in err.series:
                print(f"{s.series_uid:<66} {s.modality:<8} {s.count:>6}  {s.description}")
        return 3
    warn(vol.warnings)
    if args.json:
        print_json(vol.summary())
    else:
        s = vol.summary()
        print(f"path        {s['path']}")
        print(f"modality    {s['modality']}  ({s['units']})")
        print(f"series_uid  {s['series_uid']}")
        print(f"shape       {s['shape']}  (column i, row j, slice k)")
        print(f"spacing_mm  {s['spacing_mm']}")
        print("affine_lps  " + "\n            ".join(str(r) for r in s["affine_lps"]))
        st = s["stats"]
        print(f"values      min {st['min']:.3f}  max {st['max']:.3f}  mean {st['mean']:.3f}")
    return 0


def add_inspect(sub) -> None:
    """`medfound inspect PATH`."""
    s = sub.add_parser(
        "inspect", help="read a study and print its geometry and values",
        description="Read a DICOM file, a folder of DICOM series, a NIfTI file or a MetaImage "
        "(.mhd) into one volume and print its geometry: shape as (column i, row j, slice k), "
        "spacing, the affine to DICOM patient coordinates (LPS mm), units after the modality "
        "LUT and value statistics. A folder with several series lists them and exits 3 unless "
        "--series picks one.")
    s.add_argument("path", type=Path, help="DICOM file or folder, .nii/.nii.gz, or .mhd")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read from a folder")
    s.add_argument("--allow-gaps", action="store_true",
                   help="read a series with missing slices or uneven spacing (warns instead)")
    s.add_argument("--workers", type=int, default=None,
                   help="decoding threads for long series (default: CPU count)")
    add_max_voxels(s)
    s.set_defaults(func=cmd_inspect)


def cmd_deid(args) -> int:
    from medfound.io.deid import deidentify

    report = deidentify(args.input, args.output, key_file=args.key_file,
                        remove_dates=args.remove_dates, pseudonym_map=args.pseudonym_map,
                        progress=not args.quiet, options=args.option)
    warn(report.get("warnings", []))
    print(f"de-identified {report['files_written']} files into {args.output}"
          f" ({report['files_skipped']} skipped, {report['files_failed']} failed,"
          f" {len(report['burned_in_risk'])} flagged for burned-in text); report:"
          f" {Path(args.output) / 'deid_report.json'}")
    return 1 if report["files_failed"] else 0


def add_deid(sub) -> None:
    """`medfound deid IN OUT`."""
    s = sub.add_parser(
        "deid", help="de-identify DICOM files (PS3.15 Annex E basic profile)",
        description="Copy DICOM files from IN to OUT applying the PS3.15 Annex E Basic "
        "Application Level Confidentiality Profile: identifying attributes removed, emptied or "
        "replaced; private tags removed; UIDs replaced by a keyed hash (same input, same key, "
        "same output); dates shifted by a per-patient offset. Pixel data is untouched; images "
        "that may carry burned-in text are listed in OUT/deid_report.json. IN is never written.")
    s.add_argument("input", type=Path, metavar="IN", help="DICOM file or folder to read")
    s.add_argument("output", type=Path, metavar="OUT", help="folder to write (not inside IN)")
    s.add_argument("--key-file", type=Path,
                   help="secret key for UID hashing and date offsets; created if missing. Keep "
                   "it at the center: the same key gives the same pseudonyms on every run")
    s.add_argument("--remove-dates", action="store_true",
                   help="remove dates instead of shifting them")
    s.add_argument("--pseudonym-map", type=Path, metavar="FILE",
                   help="write the original→pseudonym map (PatientID, UIDs) to FILE, which "
                   "must stay at the center (refused inside OUT)")
    s.add_argument("--option", action="append", metavar="NAME",
                   help="a PS3.15 E.3 option, repeatable: clean-descriptors, clean-graphics, "
                   "clean-structured-content, retain-device-identity, retain-uids, "
                   "retain-patient-characteristics, retain-institution-identity, "
                   "retain-longitudinal-full-dates (default: retain-longitudinal-modified-dates)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_deid)


def cmd_phantoms(args) -> int:
    from medfound.data.phantoms import make_phantoms, make_world

    if args.preset:
        given = [f"--{k}" for k in ("centers", "cases", "modalities", "size")
                 if getattr(args, k) is not None]
        if given:
            raise MedfoundError(f"--preset {args.preset} sets the centers, cases, modalities and "
                                f"size itself; {', '.join(given)} cannot change them",
                                hint=f"drop {' '.join(given)}")
        out = make_world(args.out, preset=args.preset, seed=args.seed, workers=args.workers,
                         progress=not args.quiet, masks=args.masks)
        world = json.loads((out / "phantoms.json").read_text())
        print(f"wrote the {args.preset} world to {out}: train centers "
              f"{', '.join(world['train_centers'])}; test centers {', '.join(world['test_centers'])}"
              f" (held out; training on them is refused)")
        return 0
    centers = 3 if args.centers is None else args.centers
    out = make_phantoms(args.out, centers=centers, cases=6 if args.cases is None else args.cases,
                        seed=args.seed, modalities=args.modalities or "ct",
                        size=args.size or "small", progress=not args.quiet, masks=args.masks)
    print(f"wrote {centers} phantom centers to {out}")
    return 0


def add_phantoms(sub) -> None:
    """`medfound phantoms --out DIR`."""
    s = sub.add_parser(
        "phantoms", help="generate synthetic multi-center DICOM studies",
        description="Write synthetic imaging centers as real DICOM series: chest CT with "
        "nodules (annotations.csv in LUNA16 columns, LPS mm) and optionally MR, PET and "
        "ultrasound. Centers differ in vendor, slice thickness, pixel spacing, noise, sharpness, "
        "HU calibration and size; every case carries fake PHI. Deterministic for a seed.")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--preset", choices=["benchmark"],
                   help="a whole world instead of --centers/--cases: benchmark = 6 CT centers "
                   "(one small), LIDC/LUNA16-like nodules, look-alikes (lookalikes.csv), and a "
                   "train/test split in phantoms.json; training on its test centers is refused")
    s.add_argument("--workers", type=int, metavar="N",
                   help="processes for --preset (default: up to 4, at most the CPUs)")
    s.add_argument("--centers", type=int, help="number of centers (default 3)")
    s.add_argument("--cases", type=int, help="cases in the largest center (default 6)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--modalities", help="comma list of ct,mr,pet,us (default ct) for every "
                   "center, or one list per center separated by ';' (ct,pet;ct,mr;us,ct: "
                   "centers beyond the lists cycle through them)")
    s.add_argument("--size", choices=["small", "full"],
                   help="small ≈128×128×~100 CT for tests; full 512×512×200–400 (default small)")
    s.add_argument("--masks", action="store_true", help="also write each CT's nodule mask "
                   "(case_NNN/nodules.nii.gz, the datalist's 'mask'): ground truth for "
                   "`medfound run train_segmenter`")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_phantoms)
