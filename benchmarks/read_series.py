"""Benchmark: read one full-size CT series with medfound, SimpleITK and MONAI.

Same files, same run. Each reader runs REPEATS times, each time in a fresh Python process so
that peak memory (ru_maxrss of the child, minus its RSS after imports) is its own. Reports the
median wall time, the ratio medfound / SimpleITK, peak memory as a multiple of the volume's
float32 size, and whether geometry and values agree with SimpleITK.

    python benchmarks/read_series.py [--repeats 5] [--series DIR] [--workers N]

Without --series it generates one `--size full` phantom CT (512×512, ≈300 slices) into
benchmarks/_data/ (not committed). Writes benchmarks/results/read_series.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Each child: import its library, note RSS, read, note time and peak RSS, save the array.
CHILD = r"""
import json, resource, sys, time
import numpy as np
which, folder, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

if which == "medfound":
    from medfound.io.reader import read_volume
elif which == "simpleitk":
    import SimpleITK as sitk
else:
    from monai.transforms import LoadImage
base = rss_kb()
t0 = time.perf_counter()
if which == "medfound":
    vol = read_volume(folder, workers=workers or None)
    arr, affine = vol.array, vol.affine
elif which == "simpleitk":
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(folder))
    img = r.Execute()
    a = sitk.GetArrayViewFromImage(img)  # (k, j, i), no copy
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    affine = np.eye(4); affine[:3, :3] = d; affine[:3, 3] = img.GetOrigin()
    arr = a
else:
    img = LoadImage(reader="PydicomReader", image_only=True, affine_lps_to_ras=False)(folder)
    arr = img.numpy() if hasattr(img, "numpy") else np.asarray(img)
    affine = np.asarray(img.affine)
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if out != "-":
    a = np.asarray(arr, dtype=np.float32)
    if which == "simpleitk":
        a = a.transpose(2, 1, 0)
    np.save(out + ".npy", a)
    np.save(out + ".affine.npy", np.asarray(affine, dtype=np.float64))
print(json.dumps({"seconds": elapsed, "peak_kb": peak, "base_kb": base,
                  "shape": list(np.shape(arr)), "dtype": str(np.asarray(arr[:1]).dtype)}))
"""


def canonical(arr, affine):
    """Flip axes whose direction points against +L/+P/+S, so that readers that store the same
    voxels in another index order (MONAI stacks slices head to feet here) compare voxel by
    voxel. Only for axis-aligned volumes; the affine is adjusted to describe the same voxels."""
    import numpy as np

    affine = affine.copy()
    for a in range(3):
        col = affine[:3, a]
        if col[int(np.argmax(np.abs(col)))] < 0:
            arr = np.flip(arr, axis=a)
            affine[:3, 3] += col * (arr.shape[a] - 1)
            affine[:3, a] = -col
    return np.ascontiguousarray(arr), affine


def write_results(name: str, result: dict, markdown: str) -> None:
    """benchmarks/results/NAME.json and NAME.md; the markdown is printed too."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def machine() -> dict:
    import numpy
    import pydicom

    try:  # the reader benchmark needs it; the training one runs without it (e.g. on a GPU box)
        import SimpleITK
        sitk_version = SimpleITK.Version_VersionString()
    except ImportError:
        sitk_version = None
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "numpy": numpy.__version__,
        "pydicom": pydicom.__version__,
        "SimpleITK": sitk_version,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if "model name" in ln)
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    return info


def make_series(data_dir: Path) -> Path:
    """One full-size phantom CT series; reused when already there."""
    from medfound.data.phantoms import make_phantoms

    root = data_dir / "full"
    if not (root / "center_0").exists():
        make_phantoms(root, centers=1, cases=1, seed=7, size="full", progress=True)
    series = sorted({p.parent for p in (root / "center_0").rglob("*.dcm")})
    return series[0]


def run_child(which: str, folder: Path, out: str, workers: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, which, str(folder), out, str(workers)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{which} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--series", type=Path, help="DICOM series folder (default: a full phantom)")
    ap.add_argument("--workers", type=int, default=0, help="medfound decoding threads (0: auto)")
    ap.add_argument("--data-dir", type=Path, default=HERE / "_data")
    args = ap.parse_args()

    import numpy as np

    folder = args.series or make_series(args.data_dir)
    n_files = len(list(folder.glob("*.dcm")))
    readers = ["medfound", "simpleitk", "monai"]
    runs: dict[str, list[dict]] = {r: [] for r in readers}
    # Warm the page cache once so that no reader pays for the first disk read.
    for r in readers:
        run_child(r, folder, "-", args.workers)
    outputs = {r: str(args.data_dir / f"out_{r}") for r in readers}
    for rep in range(args.repeats):
        for r in readers:  # interleaved, so drift on a shared machine hits all alike
            runs[r].append(run_child(r, folder, outputs[r] if rep == 0 else "-", args.workers))

    ref, ref_aff = canonical(np.load(outputs["simpleitk"] + ".npy"),
                             np.load(outputs["simpleitk"] + ".affine.npy"))
    vol_mib = ref.size * 4 / 2**20
    figures = {}
    for r in readers:
        raw_aff = np.load(outputs[r] + ".affine.npy")
        arr, aff = canonical(np.load(outputs[r] + ".npy"), raw_aff)
        secs = [x["seconds"] for x in runs[r]]
        peaks = [(x["peak_kb"] - x["base_kb"]) / 1024 for x in runs[r]]
        same_shape = arr.shape == ref.shape
        figures[r] = {
            "median_s": statistics.median(secs),
            "all_s": [round(s, 4) for s in secs],
            "peak_mib_over_base": statistics.median(peaks),
            "peak_x_volume_f32": statistics.median(peaks) / vol_mib,
            "output_dtype": runs[r][0]["dtype"],
            "shape": list(arr.shape),
            "k_axis_reversed": bool(raw_aff[2, 2] < 0),
            "same_shape_as_sitk": same_shape,
            "max_abs_diff_vs_sitk": float(np.abs(arr - ref).max()) if same_shape else None,
            "affine_max_abs_diff_vs_sitk": float(np.abs(aff - ref_aff).max()),
        }
    ratio = figures["medfound"]["median_s"] / figures["simpleitk"]["median_s"]
    result = {
        "benchmark": "read_series",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "series": {"files": n_files, "shape_ijk": list(ref.shape), "volume_f32_mib": vol_mib},
        "repeats": args.repeats,
        "workers": args.workers or os.cpu_count(),
        "readers": figures,
        "ratio_time_medfound_over_simpleitk": ratio,
        "ratio_time_medfound_over_monai": figures["medfound"]["median_s"]
        / figures["monai"]["median_s"],
        "goal_met": ratio <= 1.0
        and figures["medfound"]["max_abs_diff_vs_sitk"] == 0.0
        and figures["medfound"]["affine_max_abs_diff_vs_sitk"] < 1e-4,
    }
    lines = [
        f"# read_series — {result['when']}",
        "",
        f"{n_files} files, volume {tuple(ref.shape)} (i, j, k), {vol_mib:.0f} MiB as float32; "
        f"{args.repeats} repeats; {result['machine']['cpu']}, {result['machine']['cores']} cores.",
        "",
        "| reader | median s | × SimpleITK | peak MiB | peak × f32 volume | max |Δ| vs SimpleITK | affine Δ |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in readers:
        f = figures[r]
        lines.append(
            f"| {r} | {f['median_s']:.3f} | {f['median_s'] / figures['simpleitk']['median_s']:.2f} "
            f"| {f['peak_mib_over_base']:.0f} | {f['peak_x_volume_f32']:.2f} "
            f"| {f['max_abs_diff_vs_sitk']} | {f['affine_max_abs_diff_vs_sitk']:.2g} |")
    write_results("read_series", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
