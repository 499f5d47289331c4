"""What each modality makes of a phantom patient: CT (HU), MR (T1-like), PET (SUV), US cine.

Each function takes a `Patient` (geometry, from phantom_anatomy) and a grid, and adds what the
scanner does: CT noise shaped by the reconstruction kernel, a calibration offset and the
reconstruction circle; MR contrast, coil bias field and Rician noise; PET uptake, the scanner's
point-spread function and count noise. Arrays come back in memory order (k, j, i) as float32;
`arr.T` is the (i, j, k) view the DICOM writer takes without copying.

Only numpy is used: blurs are separable convolutions with short Gaussian kernels.
"""

from __future__ import annotations

import numpy as np

from medfound.data.phantom_anatomy import Grid, Patient, render

# Hounsfield units of each tissue on a non-contrast chest CT.
CT_HU = dict(
    air=-1000.0, table=220.0, fat=-100.0, muscle=50.0, mediastinum=-85.0, abdomen=25.0,
    liver=60.0, spleen=48.0, stomach=15.0, stomach_gas=-1000.0, lung=-845.0, lung_gradient=35.0,
    pericardial_fat=-95.0, myocardium=45.0, blood=38.0, aorta=40.0, esophagus=35.0,
    cortical_bone=750.0, marrow=220.0, disc=90.0, csf=15.0, cartilage=120.0, airway_wall=30.0,
    airway=-1000.0, vessel=40.0,
)
# T1-weighted gradient echo signal (arbitrary units): fat bright, lung and cortical bone dark,
# flowing blood dark.
MR_T1 = dict(
    air=0.0, table=0.0, fat=950.0, muscle=380.0, mediastinum=820.0, abdomen=450.0, liver=560.0,
    spleen=420.0, stomach=150.0, stomach_gas=0.0, lung=35.0, lung_gradient=10.0,
    pericardial_fat=900.0, myocardium=420.0, blood=110.0, aorta=90.0, esophagus=350.0,
    cortical_bone=30.0, marrow=620.0, disc=250.0, csf=120.0, cartilage=300.0, airway_wall=200.0,
    airway=0.0, vessel=140.0,
)
# FDG standardized uptake values one hour after injection.
PET_SUV = dict(
    air=0.0, table=0.0, fat=0.35, muscle=0.7, mediastinum=0.5, abdomen=0.9, liver=2.4,
    spleen=1.9, stomach=1.6, stomach_gas=0.0, lung=0.3, lung_gradient=0.06, pericardial_fat=0.4,
    myocardium=4.5, blood=1.7, aorta=1.7, esophagus=1.3, cortical_bone=0.5, marrow=1.6, disc=0.7,
    csf=0.9, cartilage=0.6, airway_wall=0.8, airway=0.0, vessel=1.6,
)


def ct_image(p: Patient, grid: Grid, profile: dict, seed: list[int], chunk: int = 16) -> np.ndarray:
    """Chest CT in HU, float32 (k, j, i).

    profile keys: noise_hu (standard deviation after the kernel, for a 150 mm half-width
    patient), kernel_sigma_px (Gaussian in-plane blur of soft kernels, pixels), unsharp (mask
    amount of sharp kernels), hu_offset (calibration error), padding_hu (value outside the
    reconstruction circle). Slices are made `chunk` at a time.
    """
    rng = np.random.default_rng([*seed, 10])
    values = dict(CT_HU)
    values["nodules"] = [(CT_HU["lung"] + n.density * (45.0 - CT_HU["lung"]) if n.kind == "solid"
                          else 40.0, CT_HU["lung"] + n.density * (40.0 - CT_HU["lung"]))
                         for n in p.nodules]
    ni, nj, nk = grid.shape
    kernel = _kernel_2d(profile)
    # Larger patients are noisier (fewer photons through more tissue).
    sigma = profile["noise_hu"] * (p.a / 150.0) ** 1.5 / _noise_gain(kernel)
    outside = _outside_circle(grid)
    out = np.empty((nk, nj, ni), dtype=np.float32)
    for k0 in range(0, nk, chunk):
        k1 = min(nk, k0 + chunk)
        block = render(p, grid, values, k0, k1)
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(sigma)
        block = _apply_kernel(block, kernel)
        block += np.float32(profile["hu_offset"])
        np.clip(block, -1024.0, 3071.0, out=block)
        block[:, outside] = profile["padding_hu"]
        out[k0:k1] = block
    return out


def mr_image(p: Patient, grid: Grid, seed: list[int]) -> np.ndarray:
    """T1-weighted MR signal (arbitrary units ≈ 0–1500), float32 (k, j, i): tissue contrast,
    a smooth coil sensitivity (bias) field and Rician noise."""
    rng = np.random.default_rng([*seed, 20])
    values = dict(MR_T1)
    values["nodules"] = [(380.0, MR_T1["lung"] + n.density * 300.0) for n in p.nodules]
    img = render(p, grid, values)
    X, Y, Z = grid.block(0, grid.shape[2])[1]
    u, v = (X - p.x0) / p.a, (Y - p.y0) / p.b
    t = (Z - 0.5 * (p.scan[0] + p.scan[1])) / 200.0
    c = rng.normal(0, 0.12, 5)
    bias = np.clip(1 + c[0] * u + c[1] * v + c[2] * t + 0.25 * np.abs(c[3]) * v**2 + c[4] * u * t,
                   0.55, 1.6)
    img = img * bias.astype(np.float32)
    sd = np.float32(rng.uniform(12, 22))
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * sd
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * sd
    return np.sqrt((img + n1) ** 2 + n2**2)


def pet_image(p: Patient, grid: Grid, seed: list[int], fwhm_mm: float = 6.5) -> np.ndarray:
    """FDG PET in SUV (body weight), float32 (k, j, i): uptake per tissue and nodule, blurred by
    the scanner's point-spread function (FWHM in mm), with count noise (variance ∝ activity)."""
    rng = np.random.default_rng([*seed, 30])
    values = dict(PET_SUV)
    values["myocardium"] = float(rng.uniform(2.0, 9.0))  # varies with fasting and insulin
    values["liver"] = float(rng.uniform(2.0, 2.8))
    values["nodules"] = [(n.uptake, min(n.uptake, 1.0)) for n in p.nodules]
    img = render(p, grid, values, edge_mm=float(min(grid.voxel_mm)))
    sig = fwhm_mm / 2.3548 / grid.voxel_mm  # along i, j, k
    img = gaussian_blur(img, (sig[2], sig[1], sig[0]))
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise = gaussian_blur(noise, (0.6, 0.6, 0.6)) * np.float32(2.0)  # reconstruction filter
    img += noise * np.float32(0.12) * np.sqrt(np.maximum(img, 0) + 0.02)
    return np.maximum(img, 0, out=img)


def us_cine(seed: list[int], shape: tuple[int, int, int], spacing_mm: float) -> np.ndarray:
    """Abdominal ultrasound cine through a convex probe, uint8-ranged float32 (k, j, i).

    shape: (frames, rows, columns); spacing_mm: pixel size. Liver parenchyma with speckle,
    hepatic vessels and a cyst (anechoic, with posterior enhancement), a bright diaphragm, a
    breathing motion across frames, depth attenuation, log compression, a sector mask, and a
    burned-in text bar (the caller sets BurnedInAnnotation).
    """
    rng = np.random.default_rng([*seed, 40])
    nf, nj, ni = shape
    ys = (np.arange(nj) + 0.5) * spacing_mm  # depth below the top edge, mm
    xs = (np.arange(ni) - ni / 2 + 0.5) * spacing_mm
    Y, X = np.meshgrid(ys, xs, indexing="ij")
    r_probe = 40.0
    apex_y = -r_probe + 8.0
    R = np.hypot(X, Y - apex_y)
    theta = np.arctan2(X, Y - apex_y)
    half_angle = np.deg2rad(rng.uniform(30, 38))
    depth = R - r_probe
    sector = (np.abs(theta) < half_angle) & (depth > 0) & (depth < ys[-1] - 6)

    # Echogenicity map in tissue coordinates; breathing slides it up and down.
    extra = 24  # rows of tissue beyond the frame so motion never runs out of map
    ty = (np.arange(nj + 2 * extra) - extra + 0.5) * spacing_mm
    TY, TX = np.meshgrid(ty, xs, indexing="ij")
    echo = np.full(TY.shape, 1.0, dtype=np.float32)
    dia_y = ys[-1] * rng.uniform(0.72, 0.85) + 12 * np.cos(TX / 70.0)
    echo = np.where(TY > dia_y + 4, 0.6, echo)
    echo += 3.5 * np.exp(-((TY - dia_y) / 1.6) ** 2)
    for _ in range(int(rng.integers(3, 7))):  # hepatic / portal veins: anechoic, bright walls
        p0 = np.array([rng.uniform(-0.7, 0.7) * xs[-1], rng.uniform(0.15, 0.7) * ys[-1]])
        ang = rng.uniform(0, np.pi)
        p1 = p0 + rng.uniform(15, 60) * np.array([np.cos(ang), np.sin(ang)])
        r = rng.uniform(2.0, 6.0)
        d = p1 - p0
        s = np.clip(((TX - p0[0]) * d[0] + (TY - p0[1]) * d[1]) / (d @ d), 0, 1)
        dist = np.hypot(TX - p0[0] - s * d[0], TY - p0[1] - s * d[1])
        wall = np.exp(-(((dist - r) / 0.8) ** 2))
        echo = np.where(dist < r, 0.04, echo + 1.5 * wall).astype(np.float32)
    cx, cy, cr = rng.uniform(-0.2, 0.2) * xs[-1] * 2, rng.uniform(0.3, 0.5) * ys[-1], rng.uniform(6, 14)
    cyst = np.hypot(TX - cx, TY - cy) < cr
    echo = np.where(cyst, 0.02, echo)
    # Posterior acoustic enhancement: brighter band behind the cyst.
    echo *= np.where((np.abs(TX - cx) < cr) & (TY > cy), 1.6, 1.0).astype(np.float32)

    scat = rng.standard_normal((nj + 2 * extra, ni, 2)).astype(np.float32)
    period = rng.uniform(3.0, 4.5)  # s per breath
    frame_s = 1.0 / 25.0
    amp_px = rng.uniform(4.0, 9.0) / spacing_mm
    psf = (0.5 / spacing_mm, 1.5 / spacing_mm)  # axial sharper than lateral, in pixels
    atten = np.exp(-0.012 * np.maximum(depth, 0)) * (1 + 0.6 * depth / max(depth.max(), 1))
    frames = np.empty((nf, nj, ni), dtype=np.float32)
    for f in range(nf):
        shift = int(round(extra + amp_px * np.sin(2 * np.pi * f * frame_s / period)))
        shift = min(max(shift, 0), 2 * extra)
        # Speckle moves with the tissue and partly decorrelates frame to frame.
        fresh = rng.standard_normal((nj, ni, 2)).astype(np.float32)
        field = scat[shift:shift + nj] * 0.9 + fresh * 0.44
        re = gaussian_blur(field[..., 0], psf)
        im = gaussian_blur(field[..., 1], psf)
        env = np.sqrt(re**2 + im**2) * echo[shift:shift + nj] * atten
        db = 20 * np.log10(env / np.median(env[sector]) + 1e-6)
        img = np.clip((db + 42.0) / 60.0, 0, 1) * 235.0
        img[~sector] = 0
        frames[f] = img
    _text_bar(frames, rng)
    return frames


def _text_bar(frames: np.ndarray, rng: np.random.Generator) -> None:
    """Burn a line of glyph-like blocks into the top-left corner, as scanners print the
    patient name and date there."""
    nf, nj, ni = frames.shape
    h = max(5, nj // 40)
    x = max(2, ni // 60)
    for _ in range(min(24, (ni // 2) // (h + 1))):
        glyph = rng.random((h, max(3, h * 2 // 3))) < 0.45
        gw = glyph.shape[1]
        if x + gw >= ni // 2:
            break
        frames[:, 2:2 + h, x:x + gw] = np.where(glyph, 255.0, frames[:, 2:2 + h, x:x + gw])
        x += gw + 1 + (h if rng.random() < 0.2 else 0)


# --- filters -----------------------------------------------------------------------------


def gaussian_kernel(sigma_px: float) -> np.ndarray:
    r = max(1, int(np.ceil(3.0 * sigma_px)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma_px) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(arr: np.ndarray, sigmas_px) -> np.ndarray:
    """Separable Gaussian blur, one sigma (pixels) per array axis (0 or None skips an axis);
    edges replicate. Returns a new float32 array."""
    out = np.asarray(arr, dtype=np.float32)
    for axis, s in enumerate(sigmas_px):
        if s and s > 0.05:
            out = _convolve_axis(out, gaussian_kernel(float(s)), axis)
    return out if out is not arr else out.copy()


def _convolve_axis(arr: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    r = len(kernel) // 2
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (r, r)
    a = np.pad(arr, pad, mode="edge")
    n = arr.shape[axis]

    def shifted(t):
        idx = [slice(None)] * arr.ndim
        idx[axis] = slice(t, t + n)
        return a[tuple(idx)]

    out = shifted(r) * kernel[r]
    for t in range(r):  # symmetric kernel: one multiply per pair of taps
        out += (shifted(t) + shifted(2 * r - t)) * kernel[t]
    return out


def _kernel_2d(profile: dict) -> tuple[np.ndarray, float]:
    """The in-plane reconstruction kernel as (Gaussian taps, unsharp amount)."""
    if profile.get("unsharp", 0) > 0:
        return gaussian_kernel(1.0), float(profile["unsharp"])
    return gaussian_kernel(max(profile.get("kernel_sigma_px", 0.0), 0.06)), 0.0


def _noise_gain(kernel: tuple[np.ndarray, float]) -> float:
    """Standard deviation of white noise of unit sigma after the kernel."""
    g, amount = kernel
    g2 = np.outer(g, g).astype(np.float64)
    if amount > 0:
        h = -amount * g2
        c = len(g) // 2
        h[c, c] += 1 + amount
    else:
        h = g2
    return float(np.sqrt((h**2).sum()))


def _apply_kernel(block: np.ndarray, kernel: tuple[np.ndarray, float]) -> np.ndarray:
    g, amount = kernel
    blurred = _convolve_axis(_convolve_axis(block, g, 1), g, 2)  # rows j, columns i
    if amount <= 0:
        return blurred
    return block + np.float32(amount) * (block - blurred)


def _outside_circle(grid: Grid) -> np.ndarray:
    """(nj, ni) mask of pixels outside the reconstruction circle of an axial grid."""
    ni, nj, _ = grid.shape
    jj, ii = np.meshgrid(np.arange(nj) - (nj - 1) / 2, np.arange(ni) - (ni - 1) / 2, indexing="ij")
    return np.hypot(ii / (ni / 2), jj / (nj / 2)) > 1.0
