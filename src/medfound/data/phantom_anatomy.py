"""Synthetic chest anatomy: sample a patient in millimetres, render it on any axis-aligned grid.

A `Patient` is geometry only — ellipses, ellipsoids, tubes and nodules in DICOM patient
coordinates (LPS mm: x → patient's left, y → posterior, z → head). `render` paints it onto a
grid with a table of values per tissue, so one patient gives a CT (HU), an MR (T1-like signal)
and a PET (SUV) image of the same body. Edges are soft ramps one voxel wide, which stands in
for partial-volume averaging; noise, blur and scanner effects belong to the modality code.

Rendering works on a chunk of slices at a time, and every structure only touches the voxels
inside its bounding box, so a 512×512×300 volume is rendered without volume-sized temporaries
beyond the output itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Painting order: later tissues cover earlier ones where they overlap.
TISSUES = (
    "air", "table", "fat", "muscle", "mediastinum", "abdomen", "liver", "spleen", "stomach",
    "stomach_gas", "lung", "lung_gradient", "pericardial_fat", "myocardium", "blood", "aorta",
    "esophagus", "cortical_bone", "marrow", "disc", "csf", "cartilage", "airway_wall", "airway",
    "vessel",
)


@dataclass
class Tube:
    """A straight vessel/airway piece from p0 to p1 (LPS mm) whose radius goes r0 → r1 (mm)."""

    p0: np.ndarray
    p1: np.ndarray
    r0: float
    r1: float


@dataclass
class Nodule:
    """A lung nodule. center: LPS mm; diameter_mm: the annotated size.

    kind: "solid", "part-solid" or "ground-glass". core: radius of the solid core as a fraction
    of the radius (part-solid only). density: 0..1, where the nodule's value sits between lung
    (0) and solid tissue (1) — ground glass is 0.2–0.4. lobes: unit vectors and amplitudes
    that make the outline lobulated rather than a perfect sphere. uptake: SUV for PET.
    """

    center: np.ndarray
    diameter_mm: float
    kind: str
    core: float
    density: float
    lobes: np.ndarray
    lobe_amp: np.ndarray
    uptake: float
    # "isolated" (lung all around), "juxtapleural" (touching the chest wall) or "juxtavascular"
    # (touching a vessel).
    location: str = "isolated"


@dataclass
class Lookalike:
    """A structure a nodule detector mistakes for a nodule, which is none: a hard negative.

    kind: "vessel-branching" (a vessel forking, its junction a little wider than the vessel),
    "calcified-granuloma" (a small calcified sphere) or "scar" (a flat band of fibrous tissue,
    mostly under the pleura). center: LPS mm; diameter_mm: its largest extent. The body is an
    ellipsoid with half-axes `axes` (mm) along the columns of `rotation`, painted with the value
    of `tissue` (one of TISSUES); `tubes` are the vessel pieces of a branching.
    """

    kind: str
    center: np.ndarray
    diameter_mm: float
    tissue: str
    axes: np.ndarray
    rotation: np.ndarray
    tubes: list[Tube] = field(default_factory=list)


@dataclass
class Patient:
    """Geometry of one synthetic chest, all in LPS mm (see module docstring)."""

    sex: str
    age: int
    height_m: float
    weight_kg: float
    x0: float  # body centre
    y0: float
    a: float  # body half-width (x) and half-depth (y)
    b: float
    fat: float  # subcutaneous fat thickness
    muscle: float
    xc: float  # thoracic cavity (inner rib cage) centre and half-axes
    yc: float
    a_r: float
    b_r: float
    z_apex: float  # lung apex
    z_base: float  # deepest point of the costophrenic recesses
    dome: tuple[float, float]  # diaphragm dome height above z_base, (right, left)
    z_carina: float
    mediastinum: float  # half-width of the mediastinum between the lungs
    table_y: float  # top of the table (the patient lies on it)
    scan: tuple[float, float]  # scanned z range (bottom, top)
    heart_c: np.ndarray
    heart_r: np.ndarray
    spine: tuple[float, float, float]  # vertebral body centre x, y and radius
    vertebra_pitch: float
    rib_drop: float
    aorta: list[Tube] = field(default_factory=list)
    great_vessels: list[Tube] = field(default_factory=list)
    trachea: list[Tube] = field(default_factory=list)
    airways: list[Tube] = field(default_factory=list)
    vessels: list[Tube] = field(default_factory=list)
    nodules: list[Nodule] = field(default_factory=list)
    lookalikes: list[Lookalike] = field(default_factory=list)


# --- sampling ----------------------------------------------------------------------------


def sample_patient(seed: list[int], z_origin: float = 0.0, table_y: float = 130.0,
                   min_vessel_radius: float = 0.7, nodules: bool = True,
                   n_nodules: int | None = None, lookalikes: int = 0) -> Patient:
    """Draw one patient. seed: entropy list (e.g. [seed, center, case]); every part of the body
    has its own random stream, so the anatomy does not change when, say, the vessel detail
    (min_vessel_radius, mm) does. z_origin / table_y (mm) place the patient in the scanner.

    n_nodules: None draws 0–4 isolated nodules (the classic phantoms); a number places that
    many from the LIDC/LUNA16-like distribution of `place_luna_nodules` (sizes, types,
    juxtapleural and juxtavascular ones). lookalikes: how many hard negatives
    (`place_lookalikes`) to add."""
    rng = np.random.default_rng([*seed, 1])
    sex = "F" if rng.random() < 0.45 else "M"
    age = int(rng.integers(38, 82))
    height = float(rng.normal(1.60, 0.06) if sex == "F" else rng.normal(1.72, 0.07))
    bmi = float(np.clip(rng.normal(24.0, 3.5), 17.5, 36.0))
    weight = round(bmi * height**2, 1)
    a = float(np.clip((145.0 if sex == "F" else 160.0) * (bmi / 24.0) ** 0.5, 122, 188))
    b = a * float(rng.uniform(0.66, 0.76))
    fat = float(np.clip(4 + (bmi - 18) * 1.6 + (5 if sex == "F" else 0) + rng.normal(0, 2), 4, 40))
    muscle = float(rng.uniform(8, 14))
    x0 = float(rng.uniform(-15, 15))
    table_y = table_y + float(rng.uniform(-20, 20))
    y0 = table_y - b - 1.0
    # The thoracic cavity sits anterior to the body centre: the back carries spine and muscles.
    y_ant = y0 - b + fat + 0.6 * muscle + 8
    y_post = y0 + b - fat - 38
    yc, b_r = (y_ant + y_post) / 2, (y_post - y_ant) / 2
    a_r = a - fat - muscle - 10
    lung_h = float((232 if sex == "F" else 252) * height / 1.7 + rng.normal(0, 10))
    z_apex = z_origin + float(rng.uniform(-30, 30))
    z_base = z_apex - lung_h
    dome_r = float(rng.uniform(45, 65))
    dome = (dome_r, dome_r - float(rng.uniform(10, 20)))
    z_carina = z_apex - 0.32 * lung_h
    scan = (z_base - float(rng.uniform(10, 22)), z_apex + float(rng.uniform(10, 22)))
    s = a_r / 125.0
    heart_r = np.array([56 * s, 0.46 * b_r, 55 * s])
    heart_c = np.array([x0 + 0.18 * a_r, yc - 0.2 * b_r, z_base + dome[1] + 0.85 * heart_r[2]])
    rv = 16.0 * s
    spine = (x0, yc + b_r - 8, rv)
    p = Patient(
        sex=sex, age=age, height_m=round(height, 2), weight_kg=weight, x0=x0, y0=y0, a=a, b=b,
        fat=fat, muscle=muscle, xc=x0, yc=yc, a_r=a_r, b_r=b_r, z_apex=z_apex, z_base=z_base,
        dome=dome, z_carina=z_carina, mediastinum=float(rng.uniform(17, 24)), table_y=table_y,
        scan=scan, heart_c=heart_c, heart_r=heart_r, spine=spine,
        vertebra_pitch=lung_h / 10.5, rib_drop=float(rng.uniform(1.9, 2.4)) * lung_h / 10.5,
    )
    _great_vessels(p)
    _airway_tree(p, np.random.default_rng([*seed, 2]))
    _vessel_trees(p, np.random.default_rng([*seed, 3]), min_vessel_radius)
    _peripheral_vessels(p, np.random.default_rng([*seed, 5]), min_vessel_radius)
    if nodules and n_nodules is None:
        _place_nodules(p, np.random.default_rng([*seed, 4]))
    elif nodules:
        place_luna_nodules(p, np.random.default_rng([*seed, 4]), n_nodules)
    if lookalikes:
        place_lookalikes(p, np.random.default_rng([*seed, 6]), lookalikes)
    return p


def _v(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.float64)


def _great_vessels(p: Patient) -> None:
    """Aorta, pulmonary trunk, superior vena cava, trachea and main bronchi as tubes."""
    xs, ys, rv = p.spine
    z_ht = p.heart_c[2] + p.heart_r[2]  # top of the heart
    s = p.a_r / 125.0
    asc0 = _v(p.xc + 5, p.yc - 0.25 * p.b_r, z_ht - 15)
    asc1 = _v(p.xc + 5, p.yc - 0.22 * p.b_r, p.z_carina + 25)
    arch = _v(p.xc + 12, p.yc - 0.02 * p.b_r, p.z_carina + 40)
    desc0 = _v(xs + rv + 10 * s, ys - 6, p.z_carina + 28)
    desc1 = _v(xs + rv + 8 * s, ys - 10, p.scan[0] - 10)
    p.aorta = [Tube(asc0, asc1, 15 * s, 14 * s), Tube(asc1, arch, 14 * s, 13 * s),
               Tube(arch, desc0, 13 * s, 12 * s), Tube(desc0, desc1, 12 * s, 11 * s)]
    hila = _hila(p)
    pa0 = _v(p.xc + 22, p.yc - 0.32 * p.b_r, z_ht - 10)
    pa1 = _v(p.xc + 12, p.yc - 0.05 * p.b_r, p.z_carina - 15)
    svc = [_v(p.xc - 32 * s, p.yc - 0.15 * p.b_r, p.scan[1] + 10),
           _v(p.xc - 30 * s, p.yc - 0.15 * p.b_r, z_ht - 20)]
    p.great_vessels = [Tube(pa0, pa1, 13 * s, 12 * s), Tube(pa1, hila["artery_r"], 10 * s, 8 * s),
                       Tube(pa1, hila["artery_l"], 10 * s, 8 * s), Tube(*svc, 9 * s, 10 * s),
                       Tube(hila["vein_r"], _v(p.xc, p.heart_c[1] + 0.5 * p.heart_r[1],
                                               p.heart_c[2] + 0.4 * p.heart_r[2]), 7 * s, 9 * s),
                       Tube(hila["vein_l"], _v(p.xc + 10, p.heart_c[1] + 0.5 * p.heart_r[1],
                                               p.heart_c[2] + 0.4 * p.heart_r[2]), 7 * s, 9 * s)]
    r_tr = (8.0 if p.sex == "F" else 9.5) * s
    tr0 = _v(p.xc - 3, ys - rv - 30 * s, p.scan[1] + 10)
    carina = _v(p.xc - 3, ys - rv - 28 * s, p.z_carina)
    p.trachea = [Tube(tr0, carina, r_tr, r_tr),
                 Tube(carina, hila["bronchus_r"], 0.75 * r_tr, 0.65 * r_tr),
                 Tube(carina, hila["bronchus_l"], 0.68 * r_tr, 0.6 * r_tr)]


def _hila(p: Patient) -> dict[str, np.ndarray]:
    m = p.mediastinum
    y = p.yc + 0.12 * p.b_r
    return {
        "bronchus_r": _v(p.xc - m - 16, y + 4, p.z_carina - 22),
        "bronchus_l": _v(p.xc + m + 20, y + 6, p.z_carina - 32),
        "artery_r": _v(p.xc - m - 12, y - 10, p.z_carina - 18),
        "artery_l": _v(p.xc + m + 14, y - 8, p.z_carina - 10),
        "vein_r": _v(p.xc - m - 10, y - 18, p.z_carina - 55),
        "vein_l": _v(p.xc + m + 12, y - 14, p.z_carina - 60),
    }


def _airway_tree(p: Patient, rng: np.random.Generator) -> None:
    h = _hila(p)
    tubes: list[Tube] = []
    for side, key in ((-1, "bronchus_r"), (1, "bronchus_l")):
        for d in ((side * 0.5, -0.2, 1.0), (side * 0.7, 0.1, -0.6), (side * 0.3, 0.6, -0.8)):
            _grow(p, rng, h[key], _unit(d), 4.2, 1.0, tubes, max_pieces=220)
    p.airways = tubes


def _vessel_trees(p: Patient, rng: np.random.Generator, r_min: float) -> None:
    h = _hila(p)
    tubes: list[Tube] = []
    roots = []
    for side, art, vein in ((-1, "artery_r", "vein_r"), (1, "artery_l", "vein_l")):
        roots += [(h[art], (side * 0.4, -0.3, 1.0), 4.5), (h[art], (side * 1.0, 0.0, -0.1), 4.0),
                  (h[art], (side * 0.4, 0.5, -1.0), 5.0), (h[vein], (side * 0.8, -0.4, -0.5), 4.5),
                  (h[vein], (side * 0.5, 0.6, -0.4), 4.5), (h[art], (side * 0.6, 0.7, 0.5), 3.5)]
    for start, d, r in roots:
        _grow(p, rng, start, _unit(d), r, max(r_min, 0.5), tubes, max_pieces=500)
    p.vessels = tubes


def _peripheral_vessels(p: Patient, rng: np.random.Generator, r_min: float, n: int = 500) -> None:
    """Short thin vessel pieces scattered through the lungs, pointing away from the hilum and
    thinner towards the pleura: the dots and lines that make up most of a lung window (and
    most of a nodule detector's false positives), which the trees above stop short of."""
    h = _hila(p)
    lo = _v(p.xc - p.a_r, p.yc - p.b_r, p.z_base)
    hi = _v(p.xc + p.a_r, p.yc + p.b_r, p.z_apex)
    a = lo + rng.random((n, 3)) * (hi - lo)
    hilum = np.where(a[:, :1] < p.xc, h["artery_r"], h["artery_l"])
    out = a - hilum
    dist = np.linalg.norm(out, axis=1)
    d = out / dist[:, None] + rng.normal(0, 0.25, (n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    length = rng.uniform(6, 18, n)
    b = a + d * length[:, None]
    r = np.clip(2.0 - dist / 70.0, 0.45, 1.6) * rng.uniform(0.8, 1.2, n)
    keep = (r >= r_min) & lung_inside(p, a, 1.0, organs=False) & lung_inside(p, b, 1.0, organs=False)
    p.vessels += [Tube(a[i], b[i], float(r[i]), float(r[i]) * 0.8) for i in np.flatnonzero(keep)]


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _grow(p: Patient, rng: np.random.Generator, start: np.ndarray, direction: np.ndarray,
          r: float, r_min: float, out: list[Tube], max_pieces: int) -> None:
    """Grow a branching tree of tapering tubes from `start` into the lungs (breadth first).

    Branch radii follow Murray's law (r³ = r1³ + r2³) with an asymmetric split; a branch stops
    where it would leave the lung, so trees fill the lungs without piercing the chest wall.
    """
    queue = [(start, direction, r, 0)]
    n0 = len(out)
    side = 1.0 if start[0] > p.xc else -1.0
    centre = _v(p.xc + side * (p.mediastinum + 0.5 * (p.a_r - p.mediastinum)), p.yc,
                0.5 * (p.z_apex + p.z_base + p.dome[0 if side < 0 else 1]))
    while queue and len(out) - n0 < max_pieces:
        pos, d, r, gen = queue.pop(0)
        length = r * rng.uniform(3.5, 6.5) + 4
        n_steps = max(1, int(np.ceil(length / 8.0)))
        r_end = r * 0.88
        alive = True
        for s in range(n_steps):
            ra = r + (r_end - r) * s / n_steps
            rb = r + (r_end - r) * (s + 1) / n_steps
            # Wander a little; near the pleura or the diaphragm, turn back towards the lung's
            # middle a few times before giving up. The first generation starts in the
            # mediastinum (the hilum) and may cross it.
            for attempt in range(3):
                d_try = _unit(d + rng.normal(0, 0.18, 3) + 0.6 * attempt * _unit(centre - pos))
                nxt = pos + d_try * (length / n_steps)
                if gen == 0 or lung_inside(p, nxt[None, :], rb + 1.0, organs=False)[0]:
                    break
            else:
                alive = False
                break
            d = d_try
            out.append(Tube(pos, nxt, ra, rb))
            pos = nxt
        if not alive:
            continue
        asym = rng.uniform(0.55, 0.95)
        r1 = r_end / (1 + asym**3) ** (1 / 3)
        r2 = asym * r1
        axis = _unit(np.cross(d, rng.normal(size=3)))
        outward = _unit(pos - start)
        for rc, ang in ((r1, rng.uniform(12, 30)), (r2, -rng.uniform(35, 65))):
            if rc < r_min:
                continue
            dc = _rotate(d, axis, np.deg2rad(ang))
            queue.append((pos, _unit(dc + 0.3 * outward), rc, gen + 1))


def _rotate(v: np.ndarray, axis: np.ndarray, ang: float) -> np.ndarray:
    """Rodrigues' rotation of v about unit axis by ang radians."""
    return (v * np.cos(ang) + np.cross(axis, v) * np.sin(ang)
            + axis * (axis @ v) * (1 - np.cos(ang)))


def _place_nodules(p: Patient, rng: np.random.Generator) -> None:
    count = int(rng.choice([0, 1, 2, 3, 4], p=[0.15, 0.3, 0.3, 0.15, 0.1]))
    # Points on a sphere: a nodule must have lung all around it (no pleural contact).
    dirs = _sphere_dirs(26)
    placed: list[Nodule] = []
    for _ in range(count):
        kind = str(rng.choice(["solid", "part-solid", "ground-glass"], p=[0.6, 0.15, 0.25]))
        d = float(np.exp(rng.normal(np.log(8.0), 0.45)) * (1.3 if kind != "solid" else 1.0))
        d = float(np.clip(round(d, 1), 3.0, 30.0))
        r = d / 2
        for _try in range(300):
            side = -1 if rng.random() < 0.55 else 1
            x = p.xc + side * rng.uniform(p.mediastinum + r, p.a_r - r)
            y = rng.uniform(p.yc - p.b_r + r, p.yc + p.b_r - r)
            z = rng.uniform(p.z_base + p.dome[0 if side < 0 else 1] * 0.5, p.z_apex - r - 10)
            c = np.round(_v(x, y, z), 2)
            pts = np.vstack([c, c + dirs * (r + 3.0)])
            if not lung_inside(p, pts, margin=0.0).all():
                continue
            if any(np.linalg.norm(c - q.center) < r + q.diameter_mm / 2 + 6 for q in placed):
                continue
            n_lobes = 3
            density = {"solid": rng.uniform(0.95, 1.05), "part-solid": rng.uniform(0.28, 0.4),
                       "ground-glass": rng.uniform(0.22, 0.38)}[kind]
            hot = kind == "solid" and d >= 8 and rng.random() < 0.6
            uptake = rng.uniform(2.5, 9.0) if hot else rng.uniform(0.5, 1.4)
            placed.append(Nodule(
                center=c, diameter_mm=d, kind=kind,
                core=float(rng.uniform(0.3, 0.6)) if kind == "part-solid" else 0.0,
                density=float(density), lobes=_sphere_dirs(n_lobes, rng),
                lobe_amp=rng.uniform(0.03, 0.12, n_lobes), uptake=float(uptake)))
            break
    p.nodules = placed


# --- the benchmark world's nodules and look-alikes ----------------------------------------

# Nodule types. LIDC-IDRI's readers rate texture 1–5 (1–2 non-solid = ground glass, 3–4
# part-solid, 5 solid) and rate most nodules ≥ 3 mm solid; screening cohorts (NLST, NELSON) find
# roughly one nodule in four or five subsolid, pure ground glass more often than part-solid.
# Hence about three in four solid, one in seven ground glass, one in ten part-solid.
NODULE_TYPE_SHARES = {"solid": 0.75, "part-solid": 0.10, "ground-glass": 0.15}
# Where a nodule sits. Nodule-CAD work on LIDC-IDRI reports about a quarter of the nodules
# attached to the pleura and a fifth or so to a vessel; these two are the hard positives
# (a detector that looks for round blobs in clear lung misses them).
NODULE_LOCATION_SHARES = {"isolated": 0.55, "juxtapleural": 0.25, "juxtavascular": 0.20}
# Diameter (mm): log-normal with median 7 mm and σ 0.42, within 3.5–30 mm: about 70 % are
# 4–10 mm, 20 % larger (a few past 20 mm), under 10 % smaller, as in LUNA16 (1186 nodules of 3 mm
# or more, most of them 4–10 mm, the largest ~30 mm). Subsolid nodules are 1.25× larger:
# ground-glass ones are found larger than solid ones.
NODULE_DIAMETER = {"median_mm": 7.0, "sigma": 0.42, "subsolid_factor": 1.25, "min_mm": 3.5,
                   "max_mm": 30.0}
# Look-alikes: vessel branchings are a detector's commonest false positive, then calcified
# granulomas (small, very dense) and scars (flat fibrous bands, mostly subpleural).
LOOKALIKE_SHARES = {"vessel-branching": 0.4, "calcified-granuloma": 0.3, "scar": 0.3}


def draw_nodule_attributes(rng: np.random.Generator) -> tuple[str, str, float]:
    """(type, location, diameter mm) of one nodule of the benchmark distribution."""
    kind = str(rng.choice(list(NODULE_TYPE_SHARES), p=list(NODULE_TYPE_SHARES.values())))
    location = str(rng.choice(list(NODULE_LOCATION_SHARES), p=list(NODULE_LOCATION_SHARES.values())))
    nd = NODULE_DIAMETER
    d = float(np.exp(rng.normal(np.log(nd["median_mm"]), nd["sigma"])))
    d *= nd["subsolid_factor"] if kind != "solid" else 1.0
    return kind, location, float(np.clip(round(d, 1), nd["min_mm"], nd["max_mm"]))


def place_luna_nodules(p: Patient, rng: np.random.Generator, count: int, tries: int = 300) -> None:
    """Place `count` nodules drawn by `draw_nodule_attributes` in p's lungs.

    An isolated nodule has lung all around it and no vessel of 1.5 mm radius or more within
    1 mm; a juxtapleural one touches the costal pleura from inside (at most 2 mm of it in the
    chest wall, whose soft tissue reads like a solid nodule); a juxtavascular one touches or
    overlaps a vessel of 1.2 mm radius or more. Nodules keep 6 mm apart. A nodule whose place
    is not found in `tries` draws is placed as an isolated one, and dropped only if that fails
    too (rare: a large nodule in a small chest)."""
    vessels = _tube_arrays([t for t in p.vessels if max(t.r0, t.r1) >= 1.5])
    juxta = [t for t in p.vessels if t.r0 >= 1.2]
    placed: list[Nodule] = []
    for _ in range(count):
        kind, location, d = draw_nodule_attributes(rng)
        shape = _nodule_shape(rng, kind, d)
        for where in dict.fromkeys((location, "isolated")):
            c = _nodule_site(p, rng, d / 2, where, vessels, juxta, placed, tries)
            if c is not None:
                placed.append(Nodule(center=np.round(c, 2), diameter_mm=d, kind=kind,
                                     location=where, **shape))
                break
    p.nodules = placed


def _nodule_shape(rng: np.random.Generator, kind: str, d: float) -> dict:
    density = {"solid": rng.uniform(0.95, 1.05), "part-solid": rng.uniform(0.28, 0.4),
               "ground-glass": rng.uniform(0.22, 0.38)}[kind]
    hot = kind == "solid" and d >= 8 and rng.random() < 0.6
    return dict(core=float(rng.uniform(0.3, 0.6)) if kind == "part-solid" else 0.0,
                density=float(density), lobes=_sphere_dirs(3, rng),
                lobe_amp=rng.uniform(0.03, 0.12, 3),
                uptake=float(rng.uniform(2.5, 9.0) if hot else rng.uniform(0.5, 1.4)))


def _nodule_site(p: Patient, rng: np.random.Generator, r: float, where: str, vessels, juxta,
                 placed: list[Nodule], tries: int) -> np.ndarray | None:
    """A centre for a nodule of radius r at `where`, or None after `tries` draws."""
    dirs = _sphere_dirs(26)
    for _ in range(tries):
        if where == "juxtapleural":
            depth = max(r * float(rng.uniform(0.55, 0.9)), r - 2.0)
            site = _wall_point(p, rng, depth, r)
            if site is None:
                continue
            c, normal = site
            tangent = _unit(np.cross(normal, [0.0, 0.0, 1.0]))
            inner = np.vstack([c, c - normal * (r + 2.0), c + tangent * r, c - tangent * r,
                               c + [0, 0, r], c - [0, 0, r]])
            if not lung_inside(p, inner).all():
                continue
        elif where == "juxtavascular":
            if not juxta:
                return None
            t = juxta[int(rng.integers(len(juxta)))]
            s = float(rng.uniform(0.2, 0.8))
            axis = t.p1 - t.p0
            q = t.p0 + s * axis
            rv = t.r0 + s * (t.r1 - t.r0)
            off = _unit(np.cross(axis, rng.normal(size=3)))
            c = q + off * (r + rv * float(rng.uniform(-0.3, 0.6)))
            if not lung_inside(p, np.vstack([c, c + dirs * (r + 2.0)])).all():
                continue
        else:
            side = -1 if rng.random() < 0.55 else 1
            c = _v(p.xc + side * rng.uniform(p.mediastinum + r, p.a_r - r),
                   rng.uniform(p.yc - p.b_r + r, p.yc + p.b_r - r),
                   rng.uniform(p.z_base + p.dome[0 if side < 0 else 1] * 0.5, p.z_apex - r - 10))
            if not lung_inside(p, np.vstack([c, c + dirs * (r + 3.0)])).all():
                continue
            if _min_tube_sd(c, vessels) < r + 1.0:
                continue
        if any(np.linalg.norm(c - q.center) < r + q.diameter_mm / 2 + 6 for q in placed):
            continue
        return c
    return None


def _wall_point(p: Patient, rng: np.random.Generator, depth: float, r: float):
    """(point `depth` mm inside the costal pleura, the wall's outward unit normal there), or
    None when the draw lands where the lung's edge is not the chest wall (the mediastinum, the
    spine, the apex or the diaphragm). `r`: the radius of what must fit beside it."""
    side = -1.0 if rng.random() < 0.55 else 1.0
    z = float(rng.uniform(p.z_base + max(p.dome) + 10.0, p.z_apex - 40.0))
    s = float(_cavity_scale(p, z))
    a, b = p.a_r * s, p.b_r * s
    theta = float(rng.uniform(-0.5 * np.pi, 0.5 * np.pi))
    ux, uy = side * np.cos(theta), np.sin(theta)
    if abs(a * ux) < p.mediastinum + r + 5.0:
        return None
    normal = _unit((ux / a, uy / b, 0.0))
    c = _v(p.xc + a * ux, p.yc + b * uy, z) - normal * depth
    outside = (c + normal * (depth + 3.0))[None, :]
    if lung_inside(p, outside, organs=False)[0]:
        return None
    return c, normal


def place_lookalikes(p: Patient, rng: np.random.Generator, count: int, tries: int = 200) -> None:
    """Add `count` look-alikes (`Lookalike`, kinds drawn with LOOKALIKE_SHARES) to p's lungs,
    each at least 8 mm from every nodule's edge, so that a finding on one is a false positive."""
    kinds = list(LOOKALIKE_SHARES)
    found: list[Lookalike] = []
    for _ in range(count):
        kind = str(rng.choice(kinds, p=list(LOOKALIKE_SHARES.values())))
        for _try in range(tries):
            la = _draw_lookalike(p, rng, kind)
            if la is None:
                continue
            if any(np.linalg.norm(la.center - q.center) < la.diameter_mm / 2 + q.diameter_mm / 2 + 8
                   for q in (*p.nodules, *found)):
                continue
            found.append(la)
            break
    p.lookalikes = found


def _draw_lookalike(p: Patient, rng: np.random.Generator, kind: str) -> Lookalike | None:
    dirs = _sphere_dirs(14)

    def anywhere(margin: float) -> np.ndarray | None:
        side = -1 if rng.random() < 0.55 else 1
        c = _v(p.xc + side * rng.uniform(p.mediastinum + margin, p.a_r - margin),
               rng.uniform(p.yc - p.b_r + margin, p.yc + p.b_r - margin),
               rng.uniform(p.z_base + p.dome[0 if side < 0 else 1] * 0.5, p.z_apex - margin - 10))
        return c if lung_inside(p, np.vstack([c, c + dirs * margin])).all() else None

    if kind == "calcified-granuloma":
        d = float(rng.uniform(2.5, 7.0))
        c = anywhere(d / 2 + 2.0)
        if c is None:
            return None
        return Lookalike(kind, np.round(c, 2), round(d, 1), "cortical_bone",
                         np.full(3, d / 2), np.eye(3))
    if kind == "scar":
        length, width, thick = (float(rng.uniform(10, 25)), float(rng.uniform(4, 8)),
                                float(rng.uniform(2, 4)))
        if rng.random() < 0.7:  # subpleural: flat against the chest wall
            site = _wall_point(p, rng, thick / 2 + 0.5, length / 2)
            if site is None:
                return None
            c, normal = site
            t1 = _unit(np.cross(normal, rng.normal(size=3)))
            rot = np.column_stack([t1, np.cross(normal, t1), normal])
            if not lung_inside(p, np.vstack([c - normal * 2.0, c + t1 * length / 2 - normal,
                                             c - t1 * length / 2 - normal])).all():
                return None
        else:
            c = anywhere(length / 2 + 1.0)
            if c is None:
                return None
            rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        return Lookalike(kind, np.round(c, 2), round(length, 1), "muscle",
                         np.array([length / 2, width / 2, thick / 2]), rot)
    # A vessel forking: a parent and two children (Murray's law), the junction a little wider.
    r = float(rng.uniform(1.4, 2.4))
    c = anywhere(18.0)
    if c is None:
        return None
    hilum = _hila(p)["artery_r" if c[0] < p.xc else "artery_l"]
    d = _unit(_unit(c - hilum) + rng.normal(0, 0.3, 3))
    axis = _unit(np.cross(d, rng.normal(size=3)))
    asym = float(rng.uniform(0.7, 1.0))
    r1 = r / (1 + asym**3) ** (1 / 3)
    tubes = [Tube(c - d * float(rng.uniform(8, 14)), c, 1.05 * r, r)]
    for rc, ang in ((r1, rng.uniform(20, 40)), (asym * r1, -rng.uniform(20, 40))):
        tubes.append(Tube(c, c + _rotate(d, axis, np.deg2rad(ang)) * float(rng.uniform(8, 14)),
                          rc, 0.9 * rc))
    ends = np.array([t.p0 for t in tubes[:1]] + [t.p1 for t in tubes])
    if not lung_inside(p, ends, margin=2.0, organs=False).all():
        return None
    bulge = r * float(rng.uniform(1.15, 1.35))
    return Lookalike(kind, np.round(c, 2), round(2 * bulge, 1), "vessel", np.full(3, bulge),
                     np.eye(3), tubes)


def _tube_arrays(tubes: list[Tube]) -> tuple[np.ndarray, ...]:
    """Tubes as arrays (p0, p1 − p0, |p1 − p0|², r0, r1) for `_min_tube_sd`."""
    if not tubes:
        return ()
    p0 = np.array([t.p0 for t in tubes])
    d = np.array([t.p1 for t in tubes]) - p0
    return (p0, d, np.maximum((d * d).sum(1), 1e-9), np.array([t.r0 for t in tubes]),
            np.array([t.r1 for t in tubes]))


def _min_tube_sd(c: np.ndarray, arrays: tuple[np.ndarray, ...]) -> float:
    """The signed distance (mm) from point c to the nearest of the tubes (inf without tubes)."""
    if not arrays:
        return float("inf")
    p0, d, l2, r0, r1 = arrays
    s = np.clip(((c - p0) * d).sum(1) / l2, 0.0, 1.0)
    dist = np.linalg.norm(c - (p0 + s[:, None] * d), axis=1)
    return float((dist - (r0 + s * (r1 - r0))).min())


def _sphere_dirs(n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """n unit vectors: a Fibonacci sphere (even cover) or, with rng, random directions."""
    if rng is not None:
        v = rng.normal(size=(n, 3))
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    k = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * k / n)
    theta = np.pi * (1 + 5**0.5) * k
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)


# --- implicit shapes (shared by rendering and point tests) --------------------------------


def _soft(d, w: float):
    """Signed distance (mm, negative inside) → fraction inside, a ramp w mm wide."""
    return np.clip(0.5 - d / w, 0.0, 1.0)


def _ellipse_sd(u, v, a: float, b: float):
    """Approximate signed distance (mm) to the ellipse (u/a)² + (v/b)² = 1 (first order)."""
    f = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    g = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2) / np.maximum(f, 1e-6)
    return (f - 1.0) / np.maximum(g, 1.0 / np.maximum(a, b))


def _superellipse_sd(u, v, a: float, b: float, n: float = 2.6):
    """Approximate signed distance (mm) to |u/a|ⁿ + |v/b|ⁿ = 1: a rounded rectangle, the
    cross-section of a torso."""
    pu, pv = np.abs(u / a), np.abs(v / b)
    f = (pu**n + pv**n) ** (1.0 / n)
    g = np.maximum(f, 1e-6) ** (1 - n) * np.sqrt((pu ** (n - 1) / a) ** 2 + (pv ** (n - 1) / b) ** 2)
    return (f - 1.0) / np.maximum(g, 1.0 / max(a, b))


def _ellipsoid_sd(u, v, t, a: float, b: float, c: float):
    f = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (t / c) ** 2)
    g = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2 + (t / c**2) ** 2) / np.maximum(f, 1e-6)
    return (f - 1.0) / np.maximum(g, 1.0 / np.maximum(np.maximum(a, b), c))


def _cavity_scale(p: Patient, z):
    """The rib cage narrows above the lung apex (thoracic inlet)."""
    return np.clip(1.0 - (z - (p.z_apex - 40.0)) / 280.0, 0.75, 1.0)


def _diaphragm(p: Patient, x, y):
    """z of the diaphragm surface (mm) under each lung: two domes, the right one higher."""
    z = np.full(np.broadcast_shapes(np.shape(x), np.shape(y)), p.z_base, dtype=np.float64)
    for side, h in ((-1, p.dome[0]), (1, p.dome[1])):
        cx = p.xc + side * (p.mediastinum + 0.5 * (p.a_r - p.mediastinum))
        q = 1 - ((x - cx) / (0.62 * p.a_r)) ** 2 - ((y - p.yc + 0.1 * p.b_r) / (0.95 * p.b_r)) ** 2
        z = np.maximum(z, p.z_base + h * np.clip(q, 0, 1) ** 0.7)
    # The posterior recesses reach lowest.
    return z - 12.0 * np.clip((y - p.yc) / p.b_r, 0, 1)


def _lung_alpha(p: Patient, x, y, z, w: float):
    """Fraction of lung at broadcastable LPS coordinates (both lungs; mediastinum excluded)."""
    s = _cavity_scale(p, z)
    a_cav = _soft(_ellipse_sd(x - p.xc, y - p.yc, p.a_r * s, p.b_r * s), w)
    a_med = _soft(p.mediastinum - np.abs(x - p.xc), w)
    a_dia = _soft(_diaphragm(p, x, y) - z, w)
    side = np.where(x < p.xc, -1.0, 1.0)
    xs = p.xc + side * (p.mediastinum + 0.5 * (p.a_r - p.mediastinum))
    zc = p.z_apex - 75.0
    a_apex = _soft(_ellipsoid_sd(x - xs, y - (p.yc + 0.15 * p.b_r),
                                 np.maximum(z - zc, 0.0),
                                 0.75 * (p.a_r - p.mediastinum), 1.25 * p.b_r, 75.0), w)
    return np.minimum(np.minimum(a_cav, a_med), np.minimum(a_dia, a_apex))


def lung_inside(p: Patient, pts: np.ndarray, margin: float = 0.0, organs: bool = True) -> np.ndarray:
    """(N, 3) LPS points → bool: inside lung parenchyma, at least `margin` mm from the lung
    boundary and (organs=True) from the heart, aorta, spine and central airways (approximately)."""
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    # The point itself and 14 points around it at `margin`, evaluated in one vectorized call.
    offsets = np.vstack([np.zeros((1, 3)), _sphere_dirs(14) * margin]) if margin > 0 else np.zeros((1, 3))
    q = (pts[None, :, :] + offsets[:, None, :]).reshape(-1, 3)
    ok = (_lung_alpha(p, q[:, 0], q[:, 1], q[:, 2], 1e-3) >= 1.0).reshape(len(offsets), -1).all(0)
    if not organs:
        return ok
    hc, hr = p.heart_c, p.heart_r + 4 + margin
    ok &= _ellipsoid_sd(x - hc[0], y - hc[1], z - hc[2], *hr) > 0
    xs, ys, rv = p.spine
    ok &= np.hypot(x - xs, y - ys) > rv + 6 + margin
    for t in (*p.aorta, *p.trachea):
        ok &= _tube_sd(pts, t) > 3 + margin
    return ok


def _tube_sd(pts: np.ndarray, t: Tube) -> np.ndarray:
    d = t.p1 - t.p0
    s = np.clip(((pts - t.p0) @ d) / max(d @ d, 1e-9), 0, 1)
    dist = np.linalg.norm(pts - (t.p0 + s[:, None] * d), axis=1)
    return dist - (t.r0 + s * (t.r1 - t.r0))


# --- rendering ---------------------------------------------------------------------------


@dataclass
class Grid:
    """An axis-aligned voxel grid: shape (ni, nj, nk) and the (i, j, k, 1) → LPS affine.

    Each array axis must run along one patient axis (axial, coronal or sagittal slices);
    rendered chunks are laid out in memory as (k, j, i).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        m = self.affine[:3, :3]
        if not all(np.count_nonzero(np.abs(m[:, a]) > 1e-9) == 1 for a in range(3)):
            raise ValueError("Grid must be axis-aligned (one patient axis per array axis)")
        # For world axis w: which index axis runs along it, its origin and step (mm).
        self.axis_of = [int(np.argmax(np.abs(m[w]))) for w in range(3)]

    @property
    def voxel_mm(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def block(self, k0: int, k1: int, lo=None, hi=None):
        """Memory slices into a (k1-k0, nj, ni) chunk and broadcastable X, Y, Z (mm) for the
        voxels whose centres lie in the world box [lo, hi]; None when the box misses."""
        ranges = [[0, self.shape[0]], [0, self.shape[1]], [k0, k1]]
        coords = [None, None, None]
        for w in range(3):
            a = self.axis_of[w]
            o, s = self.affine[w, 3], self.affine[w, a]
            if lo is not None:
                i_lo, i_hi = sorted(((lo[w] - o) / s, (hi[w] - o) / s))
                ranges[a][0] = max(ranges[a][0], int(np.ceil(i_lo)))
                ranges[a][1] = min(ranges[a][1], int(np.floor(i_hi)) + 1)
        if any(r[1] <= r[0] for r in ranges):
            return None
        for w in range(3):
            a = self.axis_of[w]
            o, s = self.affine[w, 3], self.affine[w, a]
            v = o + s * np.arange(ranges[a][0], ranges[a][1], dtype=np.float64)
            shape = [1, 1, 1]
            shape[2 - a] = v.size
            coords[w] = v.reshape(shape)
        sl = (slice(ranges[2][0] - k0, ranges[2][1] - k0), slice(*ranges[1]), slice(*ranges[0]))
        return sl, coords


def _paint(out: np.ndarray, sl, alpha, value) -> None:
    """out ← out + alpha·(value − out) on the block: later structures cover earlier ones."""
    region = out[sl]
    region += (alpha * (value - region)).astype(out.dtype, copy=False)


def render(p: Patient, grid: Grid, values: dict, k0: int = 0, k1: int | None = None,
           edge_mm: float | None = None) -> np.ndarray:
    """Paint slices k0..k1 of `grid` with the tissue values in `values` (see TISSUES).

    values["nodules"] is one (solid value, ground-glass value) pair per nodule in p.nodules.
    Returns float32 (k1-k0, nj, ni) — memory order (k, j, i); transpose for (i, j, k).
    edge_mm: width of the soft edges (default: from the voxel size).
    """
    k1 = grid.shape[2] if k1 is None else k1
    vox = grid.voxel_mm
    w = edge_mm or float((2 * min(vox) + max(vox)) / 3)
    out = np.full((k1 - k0, grid.shape[1], grid.shape[0]), values["air"], dtype=np.float32)
    V = values

    def box(lo, hi):
        return grid.block(k0, k1, lo, hi)

    big = 1e5
    # Table: a curved couch top and a base plate, along the whole scan.
    for y_top, thick in ((p.table_y, 6.0), (p.table_y + 45.0, 5.0)):
        b = box((-250, y_top - 30, -big), (250, y_top + thick + 1, big))
        if b:
            sl, (X, Y, _) = b
            yt = y_top - 0.0006 * X**2
            alpha = np.minimum(_soft(yt - Y, w), _soft(Y - yt - thick, w)) * _soft(np.abs(X) - 240, w)
            _paint(out, sl, alpha, V["table"])

    # Body: subcutaneous fat, muscle, then the thoracic cavity.
    b = box((p.x0 - p.a - 2, p.y0 - p.b - 2, -big), (p.x0 + p.a + 2, p.y0 + p.b + 2, big))
    if b is None:
        return out
    sl, (X, Y, Z) = b
    _paint(out, sl, _soft(_superellipse_sd(X - p.x0, Y - p.y0, p.a, p.b), w), V["fat"])
    _paint(out, sl, _soft(_superellipse_sd(X - p.x0, Y - p.y0 + 0.2 * p.fat, p.a - p.fat,
                                           p.b - 0.8 * p.fat, 2.3), w), V["muscle"])
    s = _cavity_scale(p, Z)
    cav = _soft(_ellipse_sd(X - p.xc, Y - p.yc, p.a_r * s, p.b_r * s), w)
    below = _soft(Z - _diaphragm(p, X, Y), w)  # 1 under the diaphragm
    above = _soft(p.z_apex - 10.0 - Z, 4 * w)  # the thoracic inlet: neck muscles, not fat
    _paint(out, sl, cav, V["mediastinum"] + below * (V["abdomen"] - V["mediastinum"])
           + above * (V["muscle"] - V["mediastinum"]))

    # Upper abdomen under the diaphragm: liver (right), stomach and spleen (left).
    zd_top = p.z_base + max(p.dome)
    b = box((p.xc - p.a_r, p.yc - p.b_r, -big), (p.xc + p.a_r, p.yc + p.b_r, zd_top))
    if b:
        sl2, (X2, Y2, Z2) = b
        s2 = _cavity_scale(p, Z2)
        inside = np.minimum(_soft(_ellipse_sd(X2 - p.xc, Y2 - p.yc, p.a_r * s2 - 3, p.b_r * s2 - 3), w),
                            _soft(Z2 - _diaphragm(p, X2, Y2) + 4.0, w))
        _paint(out, sl2, inside * _soft(X2 - (p.xc + 0.25 * p.a_r), 2 * w), V["liver"])
        st_c = _v(p.xc + 0.5 * p.a_r, p.yc - 0.25 * p.b_r, p.z_base + p.dome[1] - 45)
        st = _soft(_ellipsoid_sd(X2 - st_c[0], Y2 - st_c[1], Z2 - st_c[2], 45, 38, 42), w) * inside
        _paint(out, sl2, st, V["stomach"])
        _paint(out, sl2, st * _soft(Y2 - (st_c[1] - 18), w), V["stomach_gas"])
        sp_c = _v(p.xc + 0.68 * p.a_r, p.yc + 0.5 * p.b_r, p.z_base + p.dome[1] - 35)
        sp = _soft(_ellipsoid_sd(X2 - sp_c[0], Y2 - sp_c[1], Z2 - sp_c[2], 28, 45, 55), w) * inside
        _paint(out, sl2, sp, V["spleen"])

    # Lungs, denser towards the dependent (posterior) side.
    b = box((p.xc - p.a_r, p.yc - p.b_r, p.z_base - 15), (p.xc + p.a_r, p.yc + p.b_r, p.z_apex + 2))
    if b:
        sl2, (X2, Y2, Z2) = b
        lung_value = V["lung"] + V["lung_gradient"] * (Y2 - p.yc) / p.b_r
        _paint(out, sl2, _lung_alpha(p, X2, Y2, Z2, w), lung_value)

    # Heart (pericardial fat, myocardium, blood pool), great vessels, oesophagus.
    hc, hr = p.heart_c, p.heart_r
    for grow_mm, name in ((4.0, "pericardial_fat"), (0.0, "myocardium"), (-11.0, "blood")):
        r = hr + grow_mm
        b = box(hc - r - w, hc + r + w)
        if b:
            sl2, (X2, Y2, Z2) = b
            _paint(out, sl2, _soft(_ellipsoid_sd(X2 - hc[0], Y2 - hc[1], Z2 - hc[2], *r), w), V[name])
    _tubes(out, grid, k0, k1, p.aorta, V["aorta"], w)
    _tubes(out, grid, k0, k1, p.great_vessels, V["blood"], w)
    xs, ys, rv = p.spine
    oes = Tube(_v(p.xc + 6, ys - rv - 10, p.scan[1] + 10), _v(p.xc + 12, ys - rv - 14, p.scan[0] - 10), 7, 7)
    _tubes(out, grid, k0, k1, [oes], V["esophagus"], w)

    _spine(out, grid, k0, k1, p, V, w)
    _ribs(out, grid, k0, k1, p, V, w)

    # Airways: all walls first, then all lumens, so junctions stay open.
    walls = [Tube(t.p0, t.p1, t.r0 * 1.25 + 0.4, t.r1 * 1.25 + 0.4) for t in (*p.trachea, *p.airways)]
    _tubes(out, grid, k0, k1, walls, V["airway_wall"], w)
    _tubes(out, grid, k0, k1, [*p.trachea, *p.airways], V["airway"], w)
    _tubes(out, grid, k0, k1, p.vessels, V["vessel"], w)
    for la in p.lookalikes:
        _tubes(out, grid, k0, k1, la.tubes, V["vessel"], w)
        _lookalike(out, grid, k0, k1, la, V[la.tissue], w)

    for n, (solid, ggo) in zip(p.nodules, V["nodules"], strict=True):
        _nodule(out, grid, k0, k1, n, solid, ggo, w)
    return out


def _tubes(out, grid: Grid, k0: int, k1: int, tubes: list[Tube], value, w: float) -> None:
    if not tubes:
        return
    p0 = np.array([t.p0 for t in tubes])
    p1 = np.array([t.p1 for t in tubes])
    rmax = np.array([max(t.r0, t.r1) for t in tubes]) + w
    lo = np.minimum(p0, p1) - rmax[:, None]
    hi = np.maximum(p0, p1) + rmax[:, None]
    # Cheap rejection of whole tubes outside this chunk's z (slab) range.
    z = grid.affine[2, 3] + grid.affine[2, grid.axis_of[2]] * np.array([k0, k1 - 1]) \
        if grid.axis_of[2] == 2 else np.array([-1e9, 1e9])
    keep = (hi[:, 2] >= z.min() - 1) & (lo[:, 2] <= z.max() + 1)
    for n in np.flatnonzero(keep):
        t = tubes[n]
        b = grid.block(k0, k1, lo[n], hi[n])
        if b is None:
            continue
        sl, (X, Y, Z) = b
        d = t.p1 - t.p0
        L2 = max(float(d @ d), 1e-9)
        vx, vy, vz = X - t.p0[0], Y - t.p0[1], Z - t.p0[2]
        s = np.clip((vx * d[0] + vy * d[1] + vz * d[2]) / L2, 0.0, 1.0)
        dist = np.sqrt((vx - s * d[0]) ** 2 + (vy - s * d[1]) ** 2 + (vz - s * d[2]) ** 2)
        _paint(out, sl, _soft(dist - (t.r0 + s * (t.r1 - t.r0)), w), value)


def _spine(out, grid, k0, k1, p: Patient, V, w: float) -> None:
    """Vertebral bodies (cortex, marrow, discs), spinal canal and spinous processes."""
    xs, ys, rv = p.spine
    b = grid.block(k0, k1, (xs - rv - 12, ys - rv - 2, -1e5), (xs + rv + 12, ys + rv + 60, 1e5))
    if b is None:
        return
    sl, (X, Y, Z) = b
    r = np.hypot(X - xs, Y - ys)
    _paint(out, sl, _soft(r - rv, w), V["cortical_bone"])
    phase = np.mod(Z - p.z_apex, p.vertebra_pitch)
    disc = _soft((0.5 * p.vertebra_pitch - 3.0) - np.abs(phase - 0.5 * p.vertebra_pitch), w)
    _paint(out, sl, _soft(r - (rv - 1.8), w), V["marrow"] + disc * (V["disc"] - V["marrow"]))
    # Neural arch: a bony ring around the canal, then the canal itself, then the spinous process.
    yc = ys + rv + 10
    rc = np.hypot(X - xs, Y - yc)
    _paint(out, sl, _soft(rc - 12.0, w) * (1 - disc), V["cortical_bone"])
    _paint(out, sl, _soft(rc - 7.5, w), V["csf"])
    sp = np.maximum(np.abs(X - xs) - 4.0, np.maximum(yc + 10 - Y, Y - (yc + 45)))
    _paint(out, sl, _soft(sp, w) * (1 - disc), V["cortical_bone"])


def _ribs(out, grid, k0, k1, p: Patient, V, w: float) -> None:
    """Twelve rib pairs around the cavity, sloping down from spine to sternum, and the sternum."""
    A, B = p.a_r + 6.0, p.b_r + 6.0
    b = grid.block(k0, k1, (p.xc - A - 8, p.yc - B - 8, -1e5),
                   (p.xc + A + 8, p.yc + B + 8, p.z_apex + 40))
    if b is None:
        return
    sl, (X, Y, Z) = b
    s = _cavity_scale(p, Z)
    u, v = (X - p.xc) / s, (Y - p.yc) / s
    f = np.sqrt((u / A) ** 2 + (v / B) ** 2)
    cos_phi = (v / B) / np.maximum(f, 1e-6)  # 1 at the spine, -1 at the sternum
    dr = _ellipse_sd(u, v, A, B)
    z1 = p.z_apex + 12.0
    h = (z1 - Z) - p.rib_drop * (1 - cos_phi) / 2
    n = np.clip(np.round(h / p.vertebra_pitch), 0, 11)
    dz = h - n * p.vertebra_pitch
    e = np.sqrt((dr / 3.8) ** 2 + (dz / 5.5) ** 2)
    phi = np.arccos(np.clip(cos_phi, -1, 1))
    end = np.where(n >= 10, 0.5 * np.pi, np.where(n >= 7, 0.78 * np.pi, 0.8 * np.pi))
    bone = _soft((e - 1.0) * 4.0, w)
    rib = bone * _soft((phi - end) * 60.0, w)
    cart = bone * _soft((end - phi) * 60.0, w) * _soft((phi - 0.95 * np.pi) * 60.0, w) * (n < 7)
    _paint(out, sl, rib, np.where(e < 0.6, V["marrow"], V["cortical_bone"]))
    _paint(out, sl, cart, V["cartilage"])
    # Sternum: anterior midline plate.
    zs0, zs1 = p.z_base + 0.6 * p.dome[0] + 20, z1 - 8
    st = np.maximum(np.maximum(np.abs(X - p.xc) - 14.0, np.abs(Y - (p.yc - B - 2)) - 6.0),
                    np.maximum(Z - zs1, zs0 - Z))
    _paint(out, sl, _soft(st, w), V["cortical_bone"])
    _paint(out, sl, _soft(st + 2.0, w), V["marrow"])


def _lookalike(out, grid, k0, k1, la: Lookalike, value, w: float) -> None:
    """Paint a look-alike's ellipsoid body (its vessel pieces are painted as tubes)."""
    ext = float(la.axes.max()) + w
    b = grid.block(k0, k1, la.center - ext, la.center + ext)
    if b is None:
        return
    sl, (X, Y, Z) = b
    d = (X - la.center[0], Y - la.center[1], Z - la.center[2])
    u = [d[0] * la.rotation[0, i] + d[1] * la.rotation[1, i] + d[2] * la.rotation[2, i]
         for i in range(3)]
    _paint(out, sl, _soft(_ellipsoid_sd(*u, *la.axes), w), value)


def _nodule_outline(grid, k0, k1, n: Nodule, margin: float):
    """(memory slices, distance from the centre, the lobulated outline's radius in that
    direction) for the voxels within the nodule's extent + `margin` mm; None when it misses."""
    r = n.diameter_mm / 2
    ext = r * (1 + n.lobe_amp.sum()) + margin
    b = grid.block(k0, k1, n.center - ext, n.center + ext)
    if b is None:
        return None
    sl, (X, Y, Z) = b
    dx, dy, dz = X - n.center[0], Y - n.center[1], Z - n.center[2]
    dist = np.sqrt(dx**2 + dy**2 + dz**2)
    inv = 1.0 / np.maximum(dist, 1e-6)
    # Lobulated outline: radius modulated by the direction's alignment with a few lobe axes.
    radius = r * np.ones_like(dist)
    for (lx, ly, lz), amp in zip(n.lobes, n.lobe_amp, strict=True):
        c = (dx * lx + dy * ly + dz * lz) * inv
        radius = radius + r * amp * (2 * c**2 - 1)
    return sl, dist, radius


def nodule_mask(p: Patient, grid: Grid) -> np.ndarray:
    """The nodules' ground-truth mask on `grid`: uint8 (k, j, i), 1 where a voxel centre lies
    inside a nodule's lobulated outline — the outline the images paint (where the painted
    nodule is half lung, half nodule), so the mask is exact for every modality drawn on it."""
    out = np.zeros(grid.shape[::-1], dtype=np.uint8)
    for n in p.nodules:
        b = _nodule_outline(grid, 0, grid.shape[2], n, 0.0)
        if b is not None:
            sl, dist, radius = b
            out[sl] |= (dist <= radius).astype(np.uint8)
    return out


def _nodule(out, grid, k0, k1, n: Nodule, solid, ggo, w: float) -> None:
    b = _nodule_outline(grid, k0, k1, n, w)
    if b is None:
        return
    sl, dist, radius = b
    alpha = _soft(dist - radius, w)
    if n.kind == "solid":
        _paint(out, sl, alpha, solid)
        return
    # Ground glass raises the lung value but leaves brighter vessels visible through it.
    region = out[sl]
    np.maximum(region, region + alpha * (ggo - region), out=region)
    if n.kind == "part-solid":
        _paint(out, sl, _soft(dist - n.core * radius, w), solid)
