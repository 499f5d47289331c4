"""Recipe: evaluate a model package on some centers' data with the LUNA16 protocol.

    medfound run evaluate_detector model=RUN/model data.root=DIR data.centers=[center_2] out_dir=EVAL

Writes EVAL/predictions.csv (seriesuid,coordX,coordY,coordZ,probability; LPS mm),
EVAL/metrics.json (cpm, froc at 1/8..8 FPs per scan, cpm_ci95, n_scans, n_nodules; the same
by size bin and, where the datalist names them, by nodule type; diameter errors by size bin;
nodules with more than one finding; COCO-style mAP at IoU 0.1) and EVAL/froc.png, and logs them to MLflow (a run named "evaluation
of ROLE CENTERS on CENTERS", role evaluation, tagged with the model's training run). The
scores are a function of the model, the data, `seed` (the bootstrap CI) and the torch thread
count (`threads`, logged as the run's ``torch_threads`` param).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from medfound.data.detection import eval_transforms
from medfound.errors import exit_on_user_error
from medfound.metrics.froc import (
    coco_map,
    diameter_agreement,
    diameter_by_size,
    duplicate_findings,
    froc,
    froc_by_group,
    plot_froc,
    size_bin,
)
from medfound.models.detection import DetectorConfig, build_detector, build_network
from medfound.train import detection as task
from medfound.train.loop import set_threads
from medfound.train.package import load_weights, read_model_json
from medfound.train.tracking import Tracker


@hydra.main(version_base=None, config_path="../configs", config_name="evaluate_detector")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.get("threads"))

    # The package says how it was built and how studies must be prepared.
    meta = read_model_json(cfg.model)
    overrides = {k: v for k, v in cfg.eval.items() if k in ("score_thresh", "sw_overlap")
                 and v is not None}
    model_cfg = DetectorConfig.from_dict({**meta["model"], **overrides})
    network = load_weights(cfg.model, build_network(model_cfg))
    detector = build_detector(model_cfg, network)

    trained_on = meta.get("provenance", {}).get("train_centers", [])
    items = task.evaluation_items(cfg.data.root, cfg.data.centers, trained_on, cfg.data.split)
    transform = eval_transforms(model_cfg.to_dict())
    metrics, rows = task.evaluate(detector, items, transform, n_bootstraps=cfg.eval.n_bootstraps,
                                  seed=cfg.seed, progress=True)

    # COCO-style mAP at IoU 0.1, for comparison with MONAI's published LUNA16 numbers.
    by_scan = {it["seriesuid"]: [] for it in items}
    for r in rows:
        by_scan[r["seriesuid"]].append(r)
    uids = list(by_scan)
    pred_boxes = [np.array([[r["coordX"], r["coordY"], r["coordZ"], *[r["diameter_mm"]] * 3]
                            for r in by_scan[u]], dtype=float).reshape(-1, 6) for u in uids]
    pred_scores = [np.array([r["probability"] for r in by_scan[u]], dtype=float) for u in uids]
    gt = {it["seriesuid"]: np.asarray(it["box"], dtype=float).reshape(-1, 6) for it in items}
    metrics["coco"] = coco_map(pred_boxes, pred_scores, [gt[u] for u in uids],
                               iou=cfg.eval.map_iou)
    # Sizes: LUNA16 scores centres only, but a finding's diameter is what a reader sees.
    annotations = task.annotations_of(items)
    metrics["diameter"] = diameter_agreement(rows, annotations, uids)
    metrics["diameter_by_size"] = diameter_by_size(rows, annotations, uids)
    # Subgroups: sensitivity of each size bin / nodule type against all false positives.
    n_boot = cfg.eval.n_bootstraps
    metrics["by_size"] = froc_by_group(rows, annotations, uids,
                                       [size_bin(a["diameter_mm"]) for a in annotations],
                                       n_bootstraps=n_boot, seed=cfg.seed)
    if annotations and all(a["nodule_type"] for a in annotations):
        metrics["by_type"] = froc_by_group(rows, annotations, uids,
                                           [a["nodule_type"] for a in annotations],
                                           n_bootstraps=n_boot, seed=cfg.seed)
    # One finding per nodule: nodules with a second finding at medfound infer's default threshold.
    metrics["duplicates"] = duplicate_findings(rows, annotations, uids, threshold=0.5)

    with (out / "predictions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=task.PREDICTION_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    curve = froc(rows, task.annotations_of(items), uids)
    plot_froc(curve, out / "froc.png", title=f"{Path(cfg.model).parent.name} on "
              + ", ".join(cfg.data.centers))

    provenance = meta.get("provenance", {})
    trained = ("federated" if provenance.get("federated")
               else provenance.get("role") or ("pooled" if len(trained_on) > 1 else "local"))
    split = "" if cfg.data.split == "auto" else f" ({cfg.data.split})"
    settings = {**OmegaConf.to_container(cfg.tracking, resolve=True)}
    settings["run_name"] = settings.get("run_name") or (
        f"evaluation of {trained} {'+'.join(trained_on)} on {'+'.join(cfg.data.centers)}{split}")
    with Tracker(settings, out_dir=out, config=OmegaConf.to_container(cfg, resolve=True),
                 tags={"task": meta.get("task"), "role": "evaluation", "model": str(Path(cfg.model).resolve()),
                       "model_role": trained, "model_run_id": provenance.get("mlflow_run_id")}) as tracker:
        tracker.log_params({"torch_threads": torch.get_num_threads()})
        tracker.log_metrics({"cpm": metrics["cpm"], "map_iou0.1": metrics["coco"]["ap"]})
        for name in ("predictions.csv", "metrics.json", "froc.png"):
            tracker.log_artifact(out / name)
    print(f"CPM {metrics['cpm']:.3f} (95% CI {metrics['cpm_ci95'][0]:.3f}–"
          f"{metrics['cpm_ci95'][1]:.3f}) on {metrics['n_scans']} scans, "
          f"{metrics['n_nodules']} nodules; results in {out}")
    size = metrics["diameter"]
    if size["n_matched"]:
        print(f"diameters of the {size['n_matched']} detected nodules: median error "
              f"{100 * size['median_relative_error']:+.0f}% (median |error| "
              f"{100 * size['median_abs_relative_error']:.0f}%, mean {size['mean_abs_error_mm']:.1f} mm)")
    for key, what in (("by_size", "size"), ("by_type", "type")):
        for group, m in metrics.get(key, {}).items():
            points = " / ".join(f"{m['froc'][r]:.2f}" for r in ("0.125", "0.25", "1", "4"))
            print(f"  {what} {group:>12}: CPM {m['cpm']:.3f} ({m['cpm_ci95'][0]:.2f}–"
                  f"{m['cpm_ci95'][1]:.2f}) on {m['n_nodules']} nodules; sensitivity at 1/8, "
                  f"1/4, 1, 4 FP/scan {points}")
    dup = metrics["duplicates"]
    print(f"nodules with more than one finding at p ≥ {dup['threshold']:g}: "
          f"{dup['n_with_duplicates']} of {dup['n_nodules']}")


if __name__ == "__main__":
    main()
