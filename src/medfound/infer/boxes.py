"""RetinaNet detector logic in numpy: anchors, box decoding, per-level selection and NMS.

Each function reproduces one MONAI piece on the same numbers (float32, same order of operations
where it changes a result), so that onnxruntime + these functions give what
`monai.apps.detection.networks.retinanet_detector.RetinaNetDetector` gives in torch:

- `cell_anchors` / `grid_anchors` ↔ `AnchorGeneratorWithAnchorShape`
- `decode_boxes` ↔ `BoxCoder.decode_single`
- `select_boxes` ↔ `BoxSelector.select_boxes_per_image` (top-k per level, clip, batched NMS)

Boxes are "xyzxyz" = (i0, j0, k0, i1, j1, k1) in voxels of the network input, MONAI's
StandardMode. No torch import here: this module runs where only numpy is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "box_iou",
    "cell_anchors",
    "decode_boxes",
    "grid_anchors",
    "merge_by_centre",
    "nms",
    "prediction_rows",
    "reshape_head_output",
    "select_boxes",
]

SPATIAL_DIMS = 3
_F32 = np.float32


def cell_anchors(base_anchor_shapes: Sequence[Sequence[float]],
                 feature_map_scales: Sequence[float]) -> list[np.ndarray]:
    """Anchors centred on 0 for each pyramid level: (A, 6) float32 per level.

    Level l uses ``feature_map_scales[l] * base_anchor_shapes``; corners are rounded half to
    even, as torch.round does in MONAI's `generate_anchors_using_shape`.
    """
    shapes = np.asarray(base_anchor_shapes, dtype=_F32)
    out = []
    for scale in feature_map_scales:
        half = (_F32(scale) * shapes) / _F32(2.0)
        out.append(np.round(np.concatenate([-half, half], axis=1)).astype(_F32))
    return out


def grid_anchors(cells: Sequence[np.ndarray], grid_sizes: Sequence[Sequence[int]],
                 image_size: Sequence[int]) -> list[np.ndarray]:
    """Anchors of every feature-map location, per level: (prod(grid) * A, 6) float32.

    `image_size` is the (padded) network input the maps came from; the stride of a level is
    ``image_size // grid_size`` per axis and a location's centre is ``n * stride + stride // 2``
    (integers, as in MONAI). Rows are ordered location-major (i slowest), anchor fastest —
    the order `reshape_head_output` gives the head outputs.
    """
    levels = []
    for cell, grid in zip(cells, grid_sizes, strict=True):
        centres = []
        for axis in range(SPATIAL_DIMS):
            stride = int(image_size[axis]) // int(grid[axis])
            centres.append(np.arange(int(grid[axis]), dtype=np.int64) * stride + stride // 2)
        mesh = np.meshgrid(*centres, indexing="ij")
        flat = np.stack([m.reshape(-1) for m in mesh], axis=1)  # (G, 3)
        shifts = np.concatenate([flat, flat], axis=1).astype(_F32)  # (G, 6)
        levels.append((shifts[:, None, :] + cell[None, :, :]).reshape(-1, 2 * SPATIAL_DIMS))
    return levels


def reshape_head_output(maps: np.ndarray, num_anchors: int) -> np.ndarray:
    """(B, A*K, i, j, k) head map → (B, i*j*k*A, K), MONAI's `_reshape_maps` order."""
    b, ak, *spatial = maps.shape
    k = ak // num_anchors
    out = maps.reshape(b, num_anchors, k, *spatial).transpose(0, 3, 4, 5, 1, 2)
    return out.reshape(b, -1, k)


def decode_boxes(rel_codes: np.ndarray, anchors: np.ndarray, weights: Sequence[float],
                 clip: float) -> np.ndarray:
    """Box offsets (N, 6) relative to `anchors` (N, 6 xyzxyz) → boxes (N, 6 xyzxyz), float32.

    centre += d * anchor size / weight; size = anchor size * exp(min(dw / weight, clip)).
    """
    rel = rel_codes.astype(_F32, copy=False)
    anchors = anchors.astype(_F32, copy=False)
    w = np.asarray(weights, dtype=_F32)  # torch divides a float32 tensor in float32
    centre = (anchors[:, :3] + anchors[:, 3:]) / _F32(2.0)
    size = anchors[:, 3:] - anchors[:, :3]
    d_ctr = rel[:, :3] / w[:3]
    d_size = np.minimum(rel[:, 3:] / w[3:], _F32(clip))
    pred_ctr = d_ctr * size + centre
    pred_size = np.exp(d_size) * size
    half = _F32(0.5) * pred_size
    return np.concatenate([pred_ctr - half, pred_ctr + half], axis=1).astype(_F32)


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each of `boxes` (N, 6) with one `box` (6,), MONAI's `box_iou` (float32, + eps)."""
    lt = np.maximum(boxes[:, :3], box[:3])
    rb = np.minimum(boxes[:, 3:], box[3:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(boxes[:, 3:] - boxes[:, :3], axis=1)
    area_box = np.prod(box[3:] - box[:3])
    return inter / (area + area_box - inter + np.finfo(_F32).eps)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float, max_keep: int = -1) -> np.ndarray:
    """Greedy non-maximum suppression; indices into `boxes`, highest score first.

    Same rule as MONAI's `non_max_suppression`: stable sort by score, keep the best, drop every
    remaining box with IoU > `iou_thresh`, stop after `max_keep` picks (all when < 1).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    ranked = boxes[order].astype(_F32, copy=False)
    remaining = np.arange(len(ranked))
    picks: list[int] = []
    while remaining.size:
        best = int(remaining[0])
        picks.append(best)
        if len(picks) >= max_keep >= 1:
            break
        keep = box_iou(ranked[remaining], ranked[best]) <= iou_thresh
        keep[0] = False
        remaining = remaining[keep]
    return order[np.asarray(picks, dtype=np.int64)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    x = x.astype(_F32, copy=False)
    return (_F32(1.0) / (_F32(1.0) + np.exp(-x))).astype(_F32)


def select_boxes(boxes_per_level: Sequence[np.ndarray], logits_per_level: Sequence[np.ndarray],
                 image_size: Sequence[int], *, score_thresh: float, topk_candidates_per_level: int,
                 nms_thresh: float, detections_per_img: int, apply_sigmoid: bool = True,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Final detections of one image: (boxes (P, 6) float32, scores (P,) float32, labels (P,) int64).

    Per level: scores = sigmoid(logits) flattened over (anchor, class); keep score >
    `score_thresh`; the best `topk_candidates_per_level`; clip boxes to `image_size` (the image
    before padding) and drop boxes thinner than one voxel. Then NMS per class over all levels
    and at most `detections_per_img` boxes.
    """
    all_boxes, all_scores, all_labels = [], [], []
    upper = np.asarray(image_size, dtype=_F32)
    for boxes, logits in zip(boxes_per_level, logits_per_level, strict=True):
        num_classes = logits.shape[-1]
        scores = _sigmoid(logits).reshape(-1) if apply_sigmoid else logits.reshape(-1).astype(_F32)
        candidates = np.flatnonzero(scores > score_thresh)
        order = np.argsort(-scores[candidates], kind="stable")[:topk_candidates_per_level]
        flat = candidates[order]
        picked = boxes[flat // num_classes]
        clipped = np.concatenate([np.clip(picked[:, :3], 0, upper), np.clip(picked[:, 3:], 0, upper)],
                                 axis=1).astype(_F32)
        keep = np.all(clipped[:, 3:] >= clipped[:, :3] + 1, axis=1)
        all_boxes.append(clipped[keep])
        all_scores.append(scores[flat][keep])
        all_labels.append((flat % num_classes)[keep].astype(np.int64))
    boxes = np.concatenate(all_boxes).astype(_F32)
    scores = np.concatenate(all_scores).astype(_F32)
    labels = np.concatenate(all_labels)
    if len(boxes) == 0:
        return boxes.reshape(0, 6), scores, labels
    # Batched NMS: shift each class far apart so boxes of different classes never overlap.
    offsets = labels.astype(_F32) * (boxes.max() + _F32(1.0))
    keep = nms(boxes + offsets[:, None], scores, nms_thresh, detections_per_img)
    return boxes[keep], scores[keep], labels[keep]


def merge_by_centre(centres_mm: np.ndarray, diameters_mm: np.ndarray, scores: np.ndarray
                    ) -> np.ndarray:
    """Indices of the findings to keep, highest score first: one finding per object.

    NMS on boxes (IoU) leaves two findings on one nodule when sliding windows or pyramid levels
    give it boxes of different sizes or offsets that barely overlap. Here a finding is dropped
    when its sphere (centre and radius, mm) overlaps that of a higher-scoring finding kept
    before it: two distinct nodules do not overlap, and two findings that each under-estimate
    one nodule's size can lie farther apart than either radius while both fall within the
    nodule's own radius (LUNA16's hit rule), which is what is counted as a second finding.
    """
    c = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    r = np.asarray(diameters_mm, dtype=np.float64).reshape(-1) / 2.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64).reshape(-1), kind="stable")
    kept: list[int] = []
    for i in order:
        if kept:
            d2 = ((c[kept] - c[i]) ** 2).sum(axis=1)
            if (d2 < (r[kept] + r[i]) ** 2).any():
                continue
        kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def prediction_rows(seriesuid: str, centres_mm: np.ndarray, diameters_mm: np.ndarray,
                    scores: np.ndarray) -> list[dict]:
    """One study's findings → LUNA16 prediction rows ``{"seriesuid", "coordX", "coordY",
    "coordZ", "probability", "diameter_mm"}`` (LPS mm), merged by `merge_by_centre`, most
    probable first. The torch evaluation path and the export's deployed path both score these
    rows, so the CPM gate compares one rule applied to two engines' boxes."""
    c = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    d = np.asarray(diameters_mm, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(c) == len(d) == len(s):
        raise ValueError(f"{len(c)} centres, {len(d)} diameters and {len(s)} scores")
    keep = merge_by_centre(c, d, s)
    return [{"seriesuid": seriesuid, "coordX": float(c[k, 0]), "coordY": float(c[k, 1]),
             "coordZ": float(c[k, 2]), "probability": float(s[k]), "diameter_mm": float(d[k])}
            for k in keep]
