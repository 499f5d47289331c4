"""medfound.metrics stage (see DESIGN.md): LUNA16 FROC / CPM, COCO detection metrics."""

from medfound.metrics.froc import (
    LUNA16_FP_RATES,
    FrocResult,
    coco_map,
    diameter_agreement,
    evaluate_luna16,
    froc,
    froc_cpm_bootstrap,
    plot_froc,
)

__all__ = [
    "LUNA16_FP_RATES",
    "FrocResult",
    "coco_map",
    "diameter_agreement",
    "evaluate_luna16",
    "froc",
    "froc_cpm_bootstrap",
    "plot_froc",
]
