"""Study in, findings out: the pipeline behind `medfound infer`.

For each study (a DICOM series folder, or a NIfTI/MetaImage file):

    read (medfound.io) → canonical axes, resample, HU window (preprocess) → sliding-window
    network (onnxruntime or OpenVINO: medfound.infer.engine) → anchors, decoding, NMS
    (postprocess) → findings

and, in ``OUT/<series_uid>/``: ``findings.json``, ``findings_sr.dcm`` (a TID 1500
Comprehensive 3D SR a PACS can show; DICOM sources only) and ``overview.png``.

With an exported segmenter (a ``nodule_segmentation`` model card) the network labels voxels
instead (medfound.infer.segment), and the study's folder holds ``segments.json`` (each connected
nodule region: volume, centre, equivalent diameter), ``mask.nii.gz`` (the labels on the study's
own grid), ``segmentation.dcm`` (a binary DICOM Segmentation over the source series a PACS can
show; DICOM sources only; medfound.io.seg) and ``overview.png`` with the labels drawn in.

Nothing is removed or replaced: OUT may not overlap a study or the model; a study's results
are made in a fresh hidden folder and renamed into place only when all its files are written,
under its series UID, or with ``_2``, ``_3``, … when OUT already holds that name; an OUT that
holds an earlier run's ``summary.json`` is refused. With annotations (a LUNA16 CSV), each
detector study's findings are scored against its nodules (medfound.infer.reference): a
``reference`` section in findings.json, ``matches_nodule`` on each finding, totals in
summary.json. A study that fails is recorded in
``OUT/summary.json`` with its error and skipped; the others go on. A full or read-only disk ends
the run with one line (the summary records the studies done). Nothing here imports torch or
MONAI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfound.errors import MedfoundError
from medfound.infer.boxes import merge_by_centre
from medfound.infer.engine import OnnxDetector, load_model_card
from medfound.infer.preprocess import preprocess
from medfound.infer.reference import (
    CRITERION,
    read_annotations,
    score_findings,
    unmatched_annotations,
)
from medfound.infer.segment import OnnxSegmenter
from medfound.io.volume import Volume, canonical_axes, voxel_boxes_to_world
from medfound.outputs import (
    DiskError,
    check_output_folder,
    disk_error,
    is_disk_error,
    publish_dir,
    staged_dir,
    unique_name,
    writable_folder,
    write_json,
)

__all__ = ["FINDINGS_FORMAT", "SEGMENTS_FORMAT", "detect_study", "findings_from_boxes",
           "infer_one_study", "model_validation", "open_model", "render_overview", "run_studies",
           "segment_study"]

FINDINGS_FORMAT = "medfound-findings/1"
SEGMENTS_FORMAT = "medfound-segments/1"
SUMMARY = "summary.json"
_TOTALS = ("n_nodules", "n_found", "n_false_positives")
# Display window of the overview (lung window), HU.
_LUNG_WINDOW = (-1350.0, 150.0)


def findings_from_boxes(boxes: np.ndarray, scores: np.ndarray, input_affine: np.ndarray,
                        study_affine: np.ndarray, threshold: float, max_findings: int
                        ) -> list[dict[str, Any]]:
    """Detector boxes (voxels of the network input, whose affine is `input_affine`) → findings
    with probability ≥ `threshold`, highest first, at most `max_findings`; findings on one
    object are merged first (`medfound.infer.boxes.merge_by_centre`).

    Each finding: ``center_lps_mm``, ``center_voxel`` (fractional (i, j, k) of the study as read,
    whose affine is `study_affine`), ``diameter_mm`` (mean of the box's three sizes),
    ``size_mm`` (along the input's i, j, k) and ``probability``.
    """
    centres, sizes = voxel_boxes_to_world(np.asarray(boxes), input_affine)
    merged = merge_by_centre(centres, sizes.mean(axis=1), scores)  # one finding per nodule
    keep = merged[np.asarray(scores)[merged] >= threshold][: max(int(max_findings), 0)]
    centres, sizes = centres[keep], sizes[keep]
    a = np.asarray(study_affine, dtype=np.float64)
    voxels = (centres - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T
    return [{"id": n + 1,
             "center_lps_mm": [round(float(v), 2) for v in c],
             "center_voxel": [round(float(v), 2) for v in ijk],
             "diameter_mm": round(float(s.mean()), 2),
             "size_mm": [round(float(v), 2) for v in s],
             "probability": round(float(scores[k]), 4)}
            for n, (k, c, ijk, s) in enumerate(zip(keep, centres, voxels, sizes, strict=True))]


def detect_study(detector: OnnxDetector, study: str | Path, *, threshold: float = 0.5,
                 max_findings: int = 20, series_uid: str | None = None
                 ) -> tuple[Volume, list[dict[str, Any]], dict[str, Any]]:
    """Read one study (the series `series_uid` of a folder holding several) and detect nodules
    in it: (volume as read, findings, facts).

    facts: ``timings_s`` (read, preprocess, network, postprocess), ``n_candidates`` (detections
    before the threshold) and ``input_shape`` (the network input's (i, j, k)).
    """
    t0 = time.perf_counter()
    volume = _read_study(study, detector.card, series_uid)
    t1 = time.perf_counter()
    image, input_affine = preprocess(volume.array, volume.affine, detector.card)
    t2 = time.perf_counter()
    outs, padded = detector.head_outputs(image)
    t3 = time.perf_counter()
    boxes, scores, _ = detector.postprocess(outs, padded, image.shape)
    findings = findings_from_boxes(boxes, scores, input_affine, volume.affine, threshold, max_findings)
    t4 = time.perf_counter()
    facts = {"timings_s": {"read": t1 - t0, "preprocess": t2 - t1, "network": t3 - t2,
                           "postprocess": t4 - t3},
             "n_candidates": len(scores), "input_shape": list(image.shape)}
    return volume, findings, facts


def segment_study(segmenter: OnnxSegmenter, study: str | Path, series_uid: str | None = None
                  ) -> tuple[Volume, np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """Read one study (the series `series_uid` of a folder holding several) and label its
    nodule voxels: (volume as read, labels on the volume's grid (uint8, 1 = nodule), nodule
    regions, facts).

    The regions (`medfound.io.seg.nodule_components`) are measured on the network's grid, where
    the labels were made; facts as for `detect_study` (``n_regions`` for ``n_candidates``)."""
    from medfound.io.seg import labels_on_grid, nodule_components

    t0 = time.perf_counter()
    volume = _read_study(study, segmenter.card, series_uid)
    t1 = time.perf_counter()
    image, input_affine = preprocess(volume.array, volume.affine, segmenter.card)
    t2 = time.perf_counter()
    labels = segmenter.segment(image)
    t3 = time.perf_counter()
    regions = nodule_components(labels == 1, input_affine)
    on_study = labels_on_grid(labels, input_affine, volume.array.shape, volume.affine)
    t4 = time.perf_counter()
    facts = {"timings_s": {"read": t1 - t0, "preprocess": t2 - t1, "network": t3 - t2,
                           "postprocess": t4 - t3},
             "n_regions": len(regions), "input_shape": list(image.shape)}
    return volume, on_study, regions, facts


def _read_study(study: str | Path, card: dict[str, Any], series_uid: str | None = None) -> Volume:
    """The study as read, refused with a clear error if the model reads another modality."""
    from medfound.io.reader import read_volume

    volume = read_volume(study, series_uid=series_uid, progress=False)
    expected = str(card["input"].get("modality", "")).upper()
    if expected in ("CT", "MR", "PT", "US") and volume.modality not in (expected, "OT"):
        raise MedfoundError(f"study modality is {volume.modality}; this model reads {expected}",
                            path=study, hint="pass studies of the model's modality")
    return volume


def render_overview(volume: Volume, findings: Sequence[dict[str, Any]], path: str | Path,
                    title: str = "", labels: np.ndarray | None = None) -> Path:
    """overview.png: a coronal average projection (radiograph-like) with every finding
    circled, and the axial slice through each of the (up to) three most probable findings.
    `labels` (on the volume's grid; a segmenter's output) are drawn in red on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    array, affine = canonical_axes(volume.array, volume.affine)  # i → L, j → P, k → S
    mask = None if labels is None else canonical_axes(np.asarray(labels) > 0, volume.affine)[0]
    red = matplotlib.colors.ListedColormap(["#ff3030"])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    inv = np.linalg.inv(affine[:3, :3])

    def ijk(f: dict[str, Any]) -> np.ndarray:
        return (np.asarray(f["center_lps_mm"], dtype=np.float64) - affine[:3, 3]) @ inv.T

    lo, hi = _LUNG_WINDOW
    shown = list(findings[:3])
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(4.2 * (1 + len(shown)), 4.6), squeeze=False)
    # Panel 1: coronal average projection (i, k), superior at the top, every finding marked.
    ax = axes[0, 0]
    ax.imshow(array.mean(axis=1).T, cmap="gray", vmin=-1000.0, vmax=100.0, origin="lower",
              aspect=spacing[2] / spacing[0], interpolation="nearest")
    if mask is not None:
        ax.imshow(np.ma.masked_equal(mask.any(axis=1).T.astype(np.uint8), 0), cmap=red, alpha=0.6,
                  origin="lower", aspect=spacing[2] / spacing[0], interpolation="nearest")
    for f in findings:
        i, _, k = ijk(f)
        ax.add_patch(Circle((i, k), 6.0, fill=False, color="#ffcc00", linewidth=1.2))
        ax.text(i + 6, k + 6, str(f["id"]), color="#ffcc00", fontsize=8)
    ax.set_title("coronal average projection", fontsize=9)
    ax.axis("off")
    # Then the axial slice through each of the top findings: rows = j (anterior at the top),
    # columns = i (the patient's left on the right, as radiologists read).
    for ax, f in zip(axes[0, 1:], shown, strict=True):
        i, j, k = ijk(f)
        k = int(np.clip(round(float(k)), 0, array.shape[2] - 1))
        ax.imshow(array[:, :, k].T, cmap="gray", vmin=lo, vmax=hi,
                  aspect=spacing[1] / spacing[0], interpolation="nearest")
        if mask is not None:
            ax.imshow(np.ma.masked_equal(mask[:, :, k].T.astype(np.uint8), 0), cmap=red,
                      alpha=0.5, aspect=spacing[1] / spacing[0], interpolation="nearest")
        radius = max(f["diameter_mm"] / 2 / spacing[0] * 1.6, 4.0)
        ax.add_patch(Circle((i, j), radius, fill=False, color="#ffcc00", linewidth=1.2))
        ax.text(i + radius, j - radius, str(f["id"]), color="#ffcc00", fontsize=8)
        what = (f"p={f['probability']:.2f}" if "probability" in f
                else f"{f['volume_mm3']:.0f} mm³")
        ax.set_title(f"#{f['id']}  {what}  {f['diameter_mm']:.1f} mm  (k={k})", fontsize=9)
        ax.axis("off")
    fig.suptitle(title or f"{len(findings)} finding(s)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def model_validation(card: dict[str, Any]) -> dict[str, Any]:
    """What the export said of the model's validation: ``status`` ("validated" or "not
    validated"), ``reason``, ``use`` (the wording findings carry) and the CPM measured."""
    v = card.get("validation") or {}
    status = v.get("status", "not validated")
    return {"status": status,
            "reason": v.get("reason", "the export records no validation"),
            "cpm": v.get("cpm"), "cpm_ci95": v.get("cpm_ci95"),
            "use": ("research use only; " if status == "validated" else
                    "NOT VALIDATED, research use only; ") + "findings are for a reader to review"}


def _study_files(study: Path) -> list[Path]:
    if study.is_file():
        return [study]
    return sorted(p for p in study.rglob("*") if p.is_file())


def _is_dicom_source(study: Path) -> bool:
    return not study.name.lower().endswith((".nii", ".nii.gz", ".mhd", ".mha"))


def infer_one_study(net: OnnxDetector | OnnxSegmenter, study: Path, out: Path,
                    model: dict[str, Any], threshold: float, max_findings: int, sr: bool,
                    used: set[str], series_uid: str | None,
                    annotations: dict[str, Any] | None = None) -> dict[str, Any]:
    """One study through `net` (from `open_model`, whose record is `model`): its results in
    a fresh folder ``OUT/<series_uid>`` (a name in `used` or in OUT gets ``_2``, …; the name
    taken is added to `used`). Returns the study's record: ``series_uid``, ``out``, ``outputs``
    (file names: findings/sr/overview or segments/mask/seg/overview), counts, ``input_shape``
    and ``timings_s`` (read, preprocess, network, postprocess, write). MedfoundError for a
    study that cannot be read; DiskError for a full or read-only OUT."""
    labels = None
    if isinstance(net, OnnxSegmenter):
        volume, labels, findings, facts = segment_study(net, study, series_uid)
    else:
        volume, findings, facts = detect_study(net, study, threshold=threshold,
                                               max_findings=max_findings, series_uid=series_uid)
    reference = None
    if annotations is not None:
        nodules = [n for n in annotations["nodules"] if n["seriesuid"] == volume.series_uid]
        reference = {"annotations": annotations["path"], **score_findings(findings, nodules)}
    t0 = time.perf_counter()
    try:
        with staged_dir(out) as work:
            if labels is not None:
                outputs = _write_segments(work, study, volume, labels, findings, model, sr)
            else:
                outputs = _write_outputs(work, study, volume, findings, facts, model, threshold, sr,
                                         reference)
            name = unique_name(out, volume.series_uid or study.name, used, reserved=(SUMMARY,))
            final = publish_dir(work, out / name)
    except MedfoundError:
        raise
    except Exception as err:  # e.g. matplotlib or pydicom meeting a full disk
        if is_disk_error(err):
            raise disk_error(err, out) from err
        raise
    used.add(name)
    facts["timings_s"]["write"] = time.perf_counter() - t0
    counts = ({"n_regions": len(findings)} if isinstance(net, OnnxSegmenter) else
              {"n_findings": len(findings), "n_candidates": facts["n_candidates"]})
    if reference is not None:
        counts["reference"] = {k: reference[k] for k in _TOTALS}
    return {"series_uid": volume.series_uid, "out": str(final), "outputs": outputs, **counts,
            "input_shape": facts["input_shape"],
            "timings_s": {k: round(v, 4) for k, v in facts["timings_s"].items()}}


def _write_outputs(work: Path, study: Path, volume: Volume, findings: list[dict[str, Any]],
                   facts: dict[str, Any], model: dict[str, Any], threshold: float, sr: bool,
                   reference: dict[str, Any] | None = None) -> dict[str, str]:
    record = {"format": FINDINGS_FORMAT, "study": str(study), "series_uid": volume.series_uid,
              "modality": volume.modality, "shape": list(volume.shape),
              "spacing_mm": [round(s, 4) for s in volume.spacing], "model": model,
              "threshold": threshold, "n_candidates": facts["n_candidates"],
              "findings": findings}
    if reference is not None:  # each finding: the id of the nodule it hits, or None
        ref = dict(reference)
        record["findings"] = [{**f, "matches_nodule": m}
                              for f, m in zip(findings, ref.pop("matches"), strict=True)]
        record["reference"] = ref
    write_json(work / "findings.json", record)
    outputs = {"findings": "findings.json"}
    if sr and _is_dicom_source(study):
        from medfound.io.sr import read_source_headers, write_nodule_sr

        headers = read_source_headers(_study_files(study), volume.series_uid)
        write_nodule_sr(findings, headers, work / "findings_sr.dcm",
                        algorithm_name=model["name"], algorithm_version=model["version"],
                        model_sha256=model["sha256"],
                        validated=model["validation"]["status"] == "validated",
                        use_note=model["validation"]["use"])
        outputs["sr"] = "findings_sr.dcm"
    render_overview(volume, findings, work / "overview.png",
                    title=f"{volume.series_uid[-24:]}: {len(findings)} finding(s) at p ≥ {threshold:g}")
    outputs["overview"] = "overview.png"
    return outputs


def _write_segments(work: Path, study: Path, volume: Volume, labels: np.ndarray,
                    regions: list[dict[str, Any]], model: dict[str, Any], seg: bool
                    ) -> dict[str, str]:
    from medfound.io.seg import labels_on_source_slices, write_labels_nifti, write_nodule_seg

    record = {"format": SEGMENTS_FORMAT, "study": str(study), "series_uid": volume.series_uid,
              "modality": volume.modality, "shape": list(volume.shape),
              "spacing_mm": [round(s, 4) for s in volume.spacing], "model": model,
              "labels": {"0": "background", "1": "nodule"},
              "nodule_voxels": int((labels == 1).sum()), "regions": regions}
    write_json(work / "segments.json", record)
    write_labels_nifti(labels, volume.affine, work / "mask.nii.gz")
    outputs = {"segments": "segments.json", "mask": "mask.nii.gz"}
    if seg and _is_dicom_source(study):
        from medfound.io.sr import read_source_headers

        headers = read_source_headers(_study_files(study), volume.series_uid)
        frames = labels_on_source_slices(labels, volume.affine, headers)
        write_nodule_seg(frames, headers, work / "segmentation.dcm", algorithm_name=model["name"],
                         algorithm_version=model["version"], model_sha256=model["sha256"])
        outputs["seg"] = "segmentation.dcm"
    render_overview(volume, regions, work / "overview.png", labels=labels,
                    title=f"{volume.series_uid[-24:]}: {len(regions)} nodule region(s)")
    outputs["overview"] = "overview.png"
    return outputs


def open_model(model: str | Path, *, providers: Sequence[str] | str | None = None,
               threads: int | None = None, precision: str = "fp32",
               trt_cache: str | Path | None = None, fp16: bool = False,
               engine: str = "onnxruntime", scoring: bool = False
               ) -> tuple[OnnxDetector | OnnxSegmenter, dict[str, Any]]:
    """The exported detector or segmenter `model`, loaded once, and the model record results
    carry (name, version, sha256, engine, precision, engine_reason, export, providers,
    validation). `scoring`: annotations will be scored (refused for a segmenter)."""
    net: OnnxDetector | OnnxSegmenter
    if "segmentation" in load_model_card(model)[1]:
        if scoring:
            raise MedfoundError("--annotations scores a detector's findings; this export is a "
                                "segmenter", path=model, hint="drop --annotations")
        if precision not in ("fp32", "auto"):
            raise MedfoundError(f"a segmenter export runs in fp32 only, not {precision}",
                                path=model, hint="drop --int8 / --precision")
        net = OnnxSegmenter(model, providers=providers, threads=threads, engine=engine)
        sha256 = net.card["onnx"]["sha256"]
    else:
        net = OnnxDetector(model, providers=providers, threads=threads, precision=precision,
                           trt_cache=trt_cache, fp16=fp16, engine=engine)
        sha256 = net.sha256
    card = net.card
    model_info = {"name": f"medfound-{card.get('task') or 'detector'}",
                  "version": str(card.get("versions", {}).get("medfound", "")),
                  "sha256": sha256, "engine": net.choice["engine"],
                  "precision": net.choice["precision"], "engine_reason": net.choice["reason"],
                  "export": str(Path(model)), "providers": net.providers,
                  "validation": model_validation(card)}
    return net, model_info


def run_studies(model: str | Path, studies: Sequence[str | Path], out: str | Path, *,
                providers: Sequence[str] | str | None = None, threads: int | None = None,
                precision: str = "fp32", trt_cache: str | Path | None = None, fp16: bool = False,
                threshold: float = 0.5, max_findings: int = 20, sr: bool = True,
                series_uid: str | None = None, progress: bool = True,
                report: Callable[[dict[str, Any]], None] | None = None,
                annotations: str | Path | None = None, engine: str = "onnxruntime",
                announce: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the exported detector or segmenter `model` on every study; write per-study outputs
    and ``OUT/summary.json`` (rewritten after each study, so an interrupted run keeps what it
    did; ``finished`` is true only once every study was tried). `sr`: also the DICOM SR
    (detector) or DICOM Segmentation (segmenter) of DICOM studies; `series_uid`: the series to
    read in folders holding several; `threshold`, `max_findings`, `precision`, `trt_cache` and
    `fp16` are the detector's. `report` is called with each study's record as it finishes
    (the CLI prints it; the progress bar stays below). `annotations`: a LUNA16 CSV of nodules
    (medfound.infer.reference) to score each detector study against; its rows of series no
    study had are listed in the summary's ``reference.unmatched`` ({seriesuid: [row, …]}).
    `engine` and `precision` ("auto" or a name): what runs the network
    (medfound.infer.engine.choose_variant); the choice and its reason are the model record's
    ``engine``, ``precision`` and ``engine_reason`` in summary.json and every findings.json, and
    `announce` is called with that record once the model is loaded (the CLI prints it).

    OUT may exist, but not overlap a study or the model, and not hold an earlier run's
    summary.json: nothing already there is removed or replaced.

    Returns the summary: ``studies`` (one record per study: ``status`` "ok" or "failed",
    ``error`` for a failure, timings and outputs for a success), ``n_ok``, ``n_failed`` and,
    with annotations, ``reference`` (the totals over the studies scored).
    """
    from tqdm.auto import tqdm

    if not studies:
        raise MedfoundError("no studies given", hint="pass one or more DICOM folders or NIfTI/MHD files")
    if not 0.0 <= threshold <= 1.0:
        raise MedfoundError(f"threshold must be in [0, 1], got {threshold}", hint="e.g. --threshold 0.5")
    out = Path(out)
    check_output_folder(out, [*studies, model])
    if (out / SUMMARY).exists():
        raise MedfoundError(f"holds the {SUMMARY} of an earlier run", path=out,
                            hint="choose a new --out folder (nothing in an existing one is replaced)")
    nodules = None if annotations is None else read_annotations(annotations)
    net, model_info = open_model(model, providers=providers, threads=threads, precision=precision,
                                 trt_cache=trt_cache, fp16=fp16, engine=engine,
                                 scoring=nodules is not None)
    writable_folder(out)
    if announce is not None:
        announce(model_info)
    summary: dict[str, Any] = {"model": model_info, "threshold": threshold, "studies": [],
                               "n_studies": len(studies), "n_ok": 0, "n_failed": 0,
                               "finished": False}
    reference = None
    if nodules is not None:
        reference = {"annotations": str(annotations), "criterion": CRITERION,
                     "n_studies_scored": 0, **dict.fromkeys(_TOTALS, 0),
                     "unmatched": unmatched_annotations(nodules, set())}
        summary["reference"] = reference
    scored: set[str] = set()
    used: set[str] = set()
    bar = tqdm(studies, desc="infer", unit="study", disable=not progress)
    for study in bar:
        study = Path(study)
        t0 = time.perf_counter()
        try:
            rec = {"study": str(study), "status": "ok",
                   **infer_one_study(net, study, out, model_info, threshold, max_findings, sr, used,
                                series_uid, None if nodules is None else
                                {"path": str(annotations), "nodules": nodules})}
            summary["n_ok"] += 1
            if reference is not None:
                scored.add(rec["series_uid"])
                reference["n_studies_scored"] += 1
                for k in _TOTALS:
                    reference[k] += rec["reference"][k]
                reference["unmatched"] = unmatched_annotations(nodules, scored)
        except DiskError:
            raise  # a full or read-only OUT: every study after this one would fail too
        except MedfoundError as err:
            rec = {"study": str(study), "status": "failed", "error": str(err)}
            summary["n_failed"] += 1
        except Exception as err:  # a reader or library failure on one study must not stop the rest
            first = (str(err).strip().splitlines() or [""])[0][:300]
            rec = {"study": str(study), "status": "failed",
                   "error": f"{study}: cannot be processed ({type(err).__name__}: {first})"}
            summary["n_failed"] += 1
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        summary["studies"].append(rec)
        if report is not None:
            report(rec)
        bar.set_postfix(ok=summary["n_ok"], failed=summary["n_failed"])
        write_json(out / SUMMARY, summary)
    summary["finished"] = True
    write_json(out / SUMMARY, summary)
    return summary
