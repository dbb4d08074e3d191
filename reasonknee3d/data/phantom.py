"""Procedural knee MRI phantoms: anatomy, nnU-Net-style label masks and MOAKS-graded lesions.

Used by ``reasonknee3d.data.synth`` to write the synthetic release. Geometry is defined in a canonical
right-knee frame in millimetres with coordinates ``(m, z, y)``: m medial (+) / lateral (-), z superior (-)
to inferior (+) with the joint line at 0, y anterior (-) to posterior (+). Each volume maps that frame onto
the field of view ``FOV_MM`` of the array axes (S, H, W) (sagittal slices on axis 0, so medial and lateral
differ along axis 0) with its own size, small rotation, translation and knee side (a left knee mirrors
axis 0). The same anatomy therefore renders at any resolution. Thin structures (cartilage, menisci,
bursae) are kept at least about one voxel thick, so at coarse test resolutions they are thicker than in
life, but every label exists.

Painting is first-writer-wins in priority order (menisci, ligaments, bone and cartilage, osteophyte and
parameniscal sites, joint fluid, fat pad, periarticular sites, unlabelled soft tissue), each structure
evaluated only inside the voxel block that bounds it. A structure draws its lesions right after it is
painted, inside its own labels, so a lesion never leaves its question's region. The mask labels anatomy
as it would be without tissue loss (a cartilage defect keeps its cartilage label), so boxes from the mask
are always defined. Intensities follow a water-excitation DESS contrast (fluid bright, cartilage
intermediate-bright, marrow and fat dark, fibrous tissue darkest), then a smooth bias field and Rician
noise.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .. import moaks
from ..prompts import MENISCUS_PARTS, location_words, meniscus_part
from ..schema import QuestionSpec, load_schema

FOV_MM = (112.0, 140.0, 140.0)
"""Field of view (mm) along the array axes (S, H, W), as OAI DESS: 160 slices of 0.7 mm, 384 x 384 pixels of
0.365 mm. A smaller shape has coarser voxels over the same field of view."""

# Tissue classes (0 = not painted yet) and their base DESS intensities.
AIR, FAT, MUSCLE, MARROW, CARTILAGE, FLUID, FIBROUS, FATPAD, EDEMA, SIGNAL, CORTEX = range(1, 12)
_INTENSITY = np.array([0, 4, 70, 150, 105, 420, 780, 30, 55, 360, 230, 15], dtype=np.float32)

# Lesion extents per grade (index = grade): the middle of each grade's interval in the MOAKS table
# (``reasonknee3d.moaks``), so the drawn lesion measures inside the grade its answer states.
BML_FRACTION = tuple(0.0 if g == 0 else m.target for g, m in enumerate(moaks.by_key("Size of BML (including cyst)")))
"""Share of the subregion's marrow taken by the lesion, cyst included (size grade: <33%, 33-66%, >66%)."""
BML_EDEMA_SHARE = tuple(0.0 if g == 0 else m.target
                        for g, m in enumerate(moaks.by_key("% of lesion that is BML (excluding cyst)")))
"""Share of the lesion that is edema rather than cyst (% BML grade: <33%, 33-66%, >66%)."""
CARTILAGE_AREA = tuple(0.0 if g == 0 else m.target for g, m in enumerate(moaks.by_key("Size of lesion")))
"""Share of the subregion's cartilage surface with loss (size grade: <10%, 10-75%, >75%)."""
FULL_THICKNESS_SHARE = tuple(0.0 if g == 0 else m.target for g, m in enumerate(moaks.by_key("Depth of lesion")))
"""Share of the defect's area where the loss reaches bone (depth grade: none, <10%, 10-75%, >75%); the rest
of the defect loses the superficial half of the cartilage."""
CARTILAGE_DEPTH = FULL_THICKNESS_SHARE
"""Former name of ``FULL_THICKNESS_SHARE``."""
PARTIAL_DEPTH = 0.5
"""Normalized depth (1 = joint surface, 0 = bone) down to which a partial-thickness defect removes cartilage."""
HOFFA_FRACTION = (0.0, 0.15, 0.35, 0.6)
"""Share of the fat pad with hyperintense signal: the phantom's reading of MOAKS mild, moderate, severe."""
EFFUSION_THICKNESS_MM = (2.5, 5.0, 9.0, 14.0)
"""Antero-posterior depth of the suprapatellar fluid (physiologic, small, medium, large)."""
EXTRUSION_MM = tuple(0.0 if g == 0 else m.target
                     for g, m in enumerate(moaks.CATEGORY_GRADES["meniscal_extrusion"]))
"""Distance (physical mm, whatever the knee's size) of the meniscal edge beyond the tibial margin (grade 0: the
meniscus stays at rest, inside it)."""

_PERIARTICULAR_SITES = {
    "pes_anserine_bursitis_presence": "pes anserine bursa site",
    "iliotibial_band_signal_presence": "iliotibial band",
    "popliteal_cyst_presence": "popliteal fossa site",
    "infrapatellar_bursitis_presence": "infrapatellar bursa site",
    "prepatellar_bursitis_presence": "prepatellar bursa site",
    # Ganglia and loose bodies both gather in the intercondylar notch; one shared site keeps labels <= 64.
    "ganglion_cyst_presence": "intercondylar notch site",
    "loose_bodies_presence": "intercondylar notch site",
}

# Meniscus shape per compartment: semi-axes (mm) of the outer rim ellipse, rim height, inner edge as a
# fraction of the rim radius, and the angular extent of the C (0 deg = outward, -90 anterior, +90 posterior).
_MENISCI = {
    "medial": dict(sgn=1.0, am=16.5, ay=20.5, height=6.0, r_in=0.55, lo=-155.0, hi=165.0),
    "lateral": dict(sgn=-1.0, am=15.5, ay=19.0, height=6.0, r_in=0.5, lo=-168.0, hi=168.0),
}


def region_label_names(spec: QuestionSpec) -> tuple[str, ...]:
    """Names of the mask labels whose union is the question's region (its box)."""
    c = spec.category
    if c == "bone_marrow_lesion":
        return (f"{spec.structure} {location_words(spec)} bone",)
    if c == "cartilage":
        return (f"{spec.structure} {location_words(spec)} cartilage",)
    if c == "osteophyte":
        return (f"{spec.finding_key} site",)
    if c == "hoffa_synovitis":
        return ("Hoffa fat pad",)
    if c == "effusion_synovitis":
        return ("joint fluid",)
    if c in ("meniscal_extrusion", "meniscal_morphology"):
        return (f"{spec.compartment} meniscus {meniscus_part(spec)}",)
    if c == "meniscal_cyst":
        return (f"{spec.compartment} parameniscal site",)
    if c == "meniscal_hypertrophy":
        return tuple(f"{spec.compartment} meniscus {p}" for p in MENISCUS_PARTS.values())
    if c == "meniscal_root_tear":
        return (f"{spec.compartment} meniscus posterior root",)
    if c == "ligament_tendon":
        key = spec.finding_key
        return (key if key.isupper() else key.replace("_", " ").lower(),)
    if c == "periarticular":
        return (_PERIARTICULAR_SITES[spec.finding_key],)
    raise KeyError(f"question {spec.question_id}: no phantom region for category {c!r}")


@lru_cache(maxsize=1)
def label_names() -> dict[int, str]:
    """Mask label id -> name (1..64): the two bone shafts, then every question region in question order."""
    names = ["femur", "tibia"]
    for qid in sorted(load_schema()):
        names += [n for n in region_label_names(load_schema()[qid]) if n not in names]
    if len(names) > 64:
        raise RuntimeError(f"{len(names)} phantom labels; nnU-Net-style masks allow at most 64")
    return {i + 1: n for i, n in enumerate(names)}


@lru_cache(maxsize=1)
def _label_ids() -> dict[str, int]:
    return {n: i for i, n in label_names().items()}


def question_labels(question_id: int) -> tuple[int, ...]:
    """Label ids of a question's region (``question_subregion_mapping.json`` of the synthetic release)."""
    ids = _label_ids()
    return tuple(ids[n] for n in region_label_names(load_schema()[question_id]))


@lru_cache(maxsize=1)
def _region_question() -> dict[tuple[str, str], int]:
    """(category, label name) -> question id, so a painter finds the grades of the region it paints."""
    return {(spec.category, n): qid for qid, spec in load_schema().items() for n in region_label_names(spec)}


# --- per-volume random parameters ---------------------------------------------------------------------

@dataclass(frozen=True)
class Anatomy:
    """Everything random about one scan except its lesions: the patient's knee and this visit's pose."""
    side: str
    """'right' or 'left'; a left knee mirrors array axis 0."""
    scale: tuple[float, float, float]
    """Size factors of the canonical (m, z, y) axes."""
    patella_shift_mm: float
    """Patella height offset (alta > 0 is higher, i.e. more superior)."""
    tissue_gain: tuple[float, ...]
    """Per-tissue intensity factors (index = tissue class)."""
    rotation_deg: tuple[float, float, float]
    """Small rotation about array axes 0, 1, 2."""
    shift_mm: tuple[float, float, float]
    """Joint centre offset from the centre of the field of view, along array axes."""
    gain: float
    """Global intensity scale of this scan."""
    noise: float
    """Noise standard deviation before the Rician magnitude."""
    bias: tuple[float, ...]
    """Bias field: (linear, quadratic) coefficient per array axis on coordinates in [-1, 1]."""


def sample_anatomy(rng: np.random.Generator, side: Optional[str] = None) -> Anatomy:
    """A random patient knee at a random first visit."""
    if side is None:
        side = "right" if rng.random() < 0.5 else "left"
    if side not in ("right", "left"):
        raise ValueError(f"knee side {side!r}: expected 'right' or 'left'")
    size = rng.uniform(0.9, 1.1)
    gains = rng.uniform(0.92, 1.08, size=len(_INTENSITY))
    return _new_visit(Anatomy(
        side=side, scale=tuple(float(size * f) for f in rng.uniform(0.96, 1.04, size=3)),
        patella_shift_mm=float(rng.uniform(-4.0, 4.0)), tissue_gain=tuple(float(g) for g in gains),
        rotation_deg=(0.0, 0.0, 0.0), shift_mm=(0.0, 0.0, 0.0), gain=1.0, noise=0.0, bias=(0.0,) * 6), rng)


def follow_up(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """The same knee scanned again: new position in the coil, new scanner gain, noise and bias field."""
    return _new_visit(anatomy, rng)


def _new_visit(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    rotation = np.clip(rng.normal(0.0, 3.0, size=3), -6.0, 6.0)
    shift = np.clip(rng.normal(0.0, (3.0, 5.0, 4.0)), (-6.0, -9.0, -8.0), (6.0, 9.0, 8.0))
    # Surface coils sit in front of the knee: anterior (low axis-2 index) is brighter.
    bias = [rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.1), rng.uniform(-0.15, 0.15),
            rng.uniform(-0.15, 0.1), rng.uniform(-0.3, -0.05), rng.uniform(-0.15, 0.1)]
    return replace(anatomy, rotation_deg=tuple(float(r) for r in rotation), shift_mm=tuple(float(s) for s in shift),
                   gain=float(rng.uniform(0.8, 1.25)), noise=float(rng.uniform(10.0, 22.0)),
                   bias=tuple(float(b) for b in bias))


def volume_affine(shape: Sequence[int], side: str) -> np.ndarray:
    """Voxel -> RAS mm affine of a sagittal DESS volume (S, H, W): axis 0 to the patient's left, rows
    superior -> inferior, columns anterior -> posterior; the knee sits off the body midline on its side."""
    sp = np.asarray(FOV_MM) / np.asarray(shape[:3], dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[sp[0], 0.0, 0.0], [0.0, 0.0, -sp[2]], [0.0, -sp[1], 0.0]])
    centre = np.array([-90.0 if side == "right" else 90.0, 10.0, -20.0])
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2.0)
    return aff


# --- the canvas: voxel blocks in canonical coordinates, first-writer-wins painting ----------------------

@dataclass
class _Grid:
    """A block of the volume and the canonical (m, z, y) mm coordinates of its voxels."""
    sl: tuple[slice, slice, slice]
    m: np.ndarray
    z: np.ndarray
    y: np.ndarray


class _Vox:
    """Some voxels of a block: their block indices and canonical coordinates ``xyz`` (N, 3)."""

    def __init__(self, g: _Grid, nz: tuple[np.ndarray, ...], xyz: Optional[np.ndarray] = None) -> None:
        self.g, self.nz = g, nz
        self.xyz = np.stack([g.m[nz], g.z[nz], g.y[nz]], axis=1) if xyz is None else xyz

    def __len__(self) -> int:
        return len(self.nz[0])

    def take(self, idx: np.ndarray) -> "_Vox":
        return _Vox(self.g, tuple(a[idx] for a in self.nz), self.xyz[idx])


class _Canvas:
    """The volume being painted: labels, tissue classes, lesion voxels, and the canonical -> voxel mapping."""

    def __init__(self, shape: tuple[int, int, int], anatomy: Anatomy,
                 severities: Mapping[int, Mapping[str, int]], rng: np.random.Generator) -> None:
        self.shape = shape
        self.sp = np.asarray(FOV_MM) / np.asarray(shape, dtype=np.float64)
        self.min_mm = 1.05 * float(self.sp.max())
        flip = np.array([1.0 if anatomy.side == "right" else -1.0, 1.0, 1.0])
        rot = Rotation.from_euler("xyz", anatomy.rotation_deg, degrees=True).as_matrix()
        self.to_phys = rot @ np.diag(np.asarray(anatomy.scale) * flip)  # canonical mm -> physical mm
        self.to_canon = np.linalg.inv(self.to_phys)
        self.shift = np.asarray(anatomy.shift_mm, dtype=np.float64)
        self.labels = np.zeros(shape, np.uint8)
        self.tissue = np.zeros(shape, np.uint8)
        self.lesions: dict[int, list[np.ndarray]] = {}
        self.severities, self.rng = severities, rng

    def grid(self, lo: Sequence[float], hi: Sequence[float]) -> Optional[_Grid]:
        """Block of voxels covering the canonical box [lo, hi] (None when it misses the volume)."""
        corners = np.array(list(itertools.product(*zip(lo, hi))), dtype=np.float64)  # (8, 3)
        phys = corners @ self.to_phys.T + self.shift
        fov = np.asarray(FOV_MM)
        first = np.floor((phys.min(0) + fov / 2) / self.sp - 0.5).astype(int)
        last = np.ceil((phys.max(0) + fov / 2) / self.sp - 0.5).astype(int) + 1
        first, last = np.clip(first, 0, self.shape), np.clip(last, 0, self.shape)
        if np.any(first >= last):
            return None
        return self.block(tuple(slice(int(a), int(b)) for a, b in zip(first, last)))

    def block(self, sl: tuple[slice, slice, slice]) -> _Grid:
        """Canonical coordinates of the voxels of one block of the volume."""
        fov = np.asarray(FOV_MM)
        axes = [((np.arange(s.start, s.stop) + 0.5) * self.sp[i] - fov[i] / 2 - self.shift[i]).astype(np.float32)
                for i, s in enumerate(sl)]
        x0, x1, x2 = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        a = self.to_canon.astype(np.float32)
        # A rotation mixes all three array axes into each canonical coordinate: (n0, n1, n2) each.
        return _Grid(sl, *(a[i, 0] * x0 + a[i, 1] * x1 + a[i, 2] * x2 for i in range(3)))

    def claim(self, g: _Grid, sel: np.ndarray) -> _Vox:
        """The voxels of ``sel`` that no higher-priority structure painted."""
        return _Vox(g, np.nonzero(sel & (self.tissue[g.sl] == 0)))

    def put(self, v: _Vox, label: int | np.ndarray, tissue: int | np.ndarray) -> None:
        self.labels[v.g.sl][v.nz] = label
        self.tissue[v.g.sl][v.nz] = tissue

    def lesion(self, question_id: int, v: _Vox, tissue: int) -> None:
        """Repaint voxels of a question's region as lesion tissue and remember them for that question."""
        self.tissue[v.g.sl][v.nz] = tissue
        idx = tuple(a + s.start for a, s in zip(v.nz, v.g.sl))
        self.lesions.setdefault(question_id, []).append(np.ravel_multi_index(idx, self.shape))

    def grades(self, category: str, label: str) -> tuple[int, dict[str, int]]:
        """Question id and severity of the region ``label`` for ``category`` (all zero when not given)."""
        qid = _region_question()[(category, label)]
        spec = load_schema()[qid]
        sev = self.severities.get(qid, {})
        return qid, {k: int(sev.get(k, 0)) for k in spec.field_keys}


def _ellipsoid(g: _Grid, centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Normalized radius (<= 1 inside) of an axis-aligned canonical ellipsoid."""
    out = np.zeros(g.m.shape, np.float32)
    for coord, c, a in zip((g.m, g.z, g.y), centre, semi):
        term = coord - np.float32(c)
        term *= np.float32(1.0 / a)
        term *= term
        out += term
    return np.sqrt(out, out=out)


def _box(centre: Sequence[float], half: Sequence[float] | float) -> tuple[np.ndarray, np.ndarray]:
    c, h = np.asarray(centre, dtype=np.float64), np.broadcast_to(np.asarray(half, dtype=np.float64), (3,))
    return c - h, c + h


def _segment(g: _Grid, p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(t, distance): position along the segment p1 -> p2 (0..1 inside) and distance from its line."""
    d = p2 - p1
    rel = (g.m - p1[0], g.z - p1[1], g.y - p1[2])
    t = (rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / float(d @ d)
    dist = np.sqrt((rel[0] - t * d[0]) ** 2 + (rel[1] - t * d[1]) ** 2 + (rel[2] - t * d[2]) ** 2)
    return t, dist


def _smallest(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest scores (1 <= k <= len)."""
    k = int(min(max(k, 1), len(score)))
    return np.argpartition(score, k - 1)[:k]


def _inside_or_nearest(score: np.ndarray, at_least: int = 1) -> np.ndarray:
    """Indices with score <= 0, or the ``at_least`` lowest when fewer (a lesion stays visible when the
    voxels are coarser than the pattern)."""
    return _smallest(score, max(int(np.count_nonzero(score <= 0)), at_least))


def _fraction(n: int, frac: float) -> int:
    return max(1, int(round(frac * n)))


def _spread_seeds(v: _Vox, n: int, rng: np.random.Generator, near: Optional[np.ndarray] = None) -> np.ndarray:
    """``n`` well-separated seed points among the voxels (preferring ``near`` ones): farthest-point picks."""
    pool = np.flatnonzero(near) if near is not None and np.any(near) else np.arange(len(v))
    cand = v.xyz[rng.choice(pool, size=min(len(pool), 64), replace=False)]
    seeds = [cand[0]]
    for _ in range(n - 1):
        d = np.min(np.linalg.norm(cand[:, None, :] - np.asarray(seeds)[None], axis=2), axis=1)
        seeds.append(cand[int(np.argmax(d))])
    return np.asarray(seeds)


def _seed_distance(v: _Vox, seeds: np.ndarray, stretch: np.ndarray) -> np.ndarray:
    """Distance of every voxel to its nearest seed, in a stretched metric (oval blobs)."""
    diff = (v.xyz[:, None, :] - seeds[None, :, :]) * stretch  # (N, n_seeds, 3)
    return np.sqrt((diff ** 2).sum(-1)).min(axis=1)


# --- geometry of the canonical knee ---------------------------------------------------------------------

class _Knee:
    """Landmarks (mm) of the canonical knee for one patient at one voxel size."""

    def __init__(self, anatomy: Anatomy, min_mm: float) -> None:
        self.min_mm = min_mm
        self.scale = tuple(float(f) for f in anatomy.scale)  # canonical -> physical mm per (m, z, y) axis
        self.tc_f, self.tc_t, self.tc_p = max(2.2, min_mm), max(2.0, min_mm), max(3.0, min_mm)
        gap = 0.6
        self.z_fb = -(gap / 2 + self.tc_f)  # lowest point of the femoral condyles (bone)
        self.z_tb = gap / 2 + self.tc_t  # tibial plateau (bone)
        self.z_men = gap / 2  # the menisci rest on the tibial cartilage
        self.cond_semi = np.array([14.0, 20.0, 24.0])
        self.cond_m, self.zc, self.yc = 19.0, self.z_fb - 20.0, 4.0
        self.shaft_semi, self.ys = (30.0, 19.0), 0.0
        self.y_front = self.ys - self.shaft_semi[1]  # anterior femoral surface (trochlea)
        self.z_epi_f = self.zc - 22.0  # femoral subregions lie below (inferior to) this level
        self.tib_semi, self.yt = (37.0, 25.0), 4.0
        self.z_epi_t = self.z_tb + 22.0
        self.pat_semi = np.array([20.0, 17.0, 9.0])
        self.pat_c = np.array([0.0, self.zc - 10.0 - anatomy.patella_shift_mm,
                               self.y_front - self.tc_f - gap - self.tc_p - self.pat_semi[2]])
        self.thin = 0.6 * min_mm  # smallest half-thickness of a structure that must show
        # Patellar tendon: lower patellar pole -> tibial tuberosity (a bump on the anterior tibia).
        self.tendon_half = (12.0, max(3.5, self.thin))  # half width (m), half thickness
        z_tub = self.z_tb + 30.0
        self.tuberosity = (np.array([0.0, z_tub, -12.0]), np.array([9.0, 10.0, 10.0]))
        self.tendon = (np.array([0.0, self.pat_c[1] + self.pat_semi[1] - 2.0, self.pat_c[2] - 2.0]),
                       np.array([0.0, z_tub, -22.5]))
        self.unit = max(2.6, 0.75 * min_mm)  # osteophyte growth per grade

    def tibia_scale(self, z: np.ndarray | float) -> np.ndarray | float:
        """Cross-section factor of the tibia: the plateau flares, the shaft is narrow."""
        return 1.0 - 0.55 * np.clip((z - self.z_tb - 10.0) / 35.0, 0.0, 1.0)

    def tibia_front(self, z: float) -> float:
        return float(self.yt - self.tib_semi[1] * self.tibia_scale(z))

    def root_degrees(self, comp: str) -> float:
        """Angular length of the posterior root (the end of the posterior horn): about 5 mm, at least a voxel."""
        p = _MENISCI[comp]
        return max(18.0, float(np.degrees(1.6 * self.min_mm / (0.5 * (p["am"] + p["ay"])))))

    def meniscus_height(self, comp: str, hypertrophy: bool) -> float:
        h = max(_MENISCI[comp]["height"], 1.6 * self.min_mm)
        return h * (1.6 if hypertrophy else 1.0)

    def extrusion_offsets(self, comp: str, body_grade: int, anterior_grade: int) -> tuple[float, float]:
        """Displacements (mm) of the meniscal body outward and of the anterior horn forward."""
        p = _MENISCI[comp]
        mc = self.cond_m
        body_gap = self.tib_semi[0] - (mc + p["am"])  # rim to tibial margin at rest
        y_margin = self.yt - self.tib_semi[1] * np.sqrt(1.0 - (mc / self.tib_semi[0]) ** 2)
        ant_gap = (self.yc - p["ay"]) - y_margin

        def shift(grade: int, gap: float, scale: float) -> float:
            # EXTRUSION_MM is physical: the canonical displacement is divided by this knee's size factor.
            return 0.0 if grade == 0 else EXTRUSION_MM[grade] / scale + gap
        return shift(body_grade, body_gap, self.scale[0]), shift(anterior_grade, ant_gap, self.scale[2])


def _surface(centre: Sequence[float], semi: Sequence[float],
             direction: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Point of an ellipsoid's surface along ``direction`` from its centre, and the outward unit normal."""
    c, a = np.asarray(centre, dtype=np.float64), np.asarray(semi, dtype=np.float64)
    u = np.asarray(direction, dtype=np.float64)
    u = u / np.linalg.norm(u)
    p = c + u / np.sqrt(np.sum((u / a) ** 2))
    n = (p - c) / a ** 2
    return p, n / np.linalg.norm(n)


def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# --- lesion drawers -------------------------------------------------------------------------------------

def _draw_bml(cv: _Canvas, qid: int, sev: Mapping[str, int], v: _Vox, near: Optional[np.ndarray]) -> None:
    size, number, pct = sev.values()
    if size == 0 or len(v) == 0:
        return
    n_blobs = number if number < 3 else int(cv.rng.integers(3, 5))
    seeds = _spread_seeds(v, n_blobs, cv.rng, near)
    dist = _seed_distance(v, seeds, cv.rng.uniform(0.7, 1.4, size=3))
    lesion = _smallest(dist, _fraction(len(v), BML_FRACTION[size]))
    # The cyst is the core of each blob (nearest its seed); the rest is edema.
    order = lesion[np.argsort(dist[lesion], kind="stable")]
    n_cyst = int(round((1.0 - BML_EDEMA_SHARE[pct]) * len(order)))
    cv.lesion(qid, v.take(order[n_cyst:]), EDEMA)
    if n_cyst:
        cv.lesion(qid, v.take(order[:n_cyst]), FLUID)


def _draw_cartilage(cv: _Canvas, qid: int, sev: Mapping[str, int], v: _Vox, depth: np.ndarray) -> None:
    """A defect over ``CARTILAGE_AREA[size]`` of the subregion: full-thickness loss over the
    ``FULL_THICKNESS_SHARE[depth]`` of it nearest its centre, loss of the superficial half elsewhere.

    ``depth`` is each voxel's normalized depth (1 at the joint surface, 0 at bone). Area is measured along
    the surface: the distance from the centre voxel without its component across the layer, which a local
    linear fit of depth against position gives (its gradient is the surface normal over the thickness).
    So every layer of a surface position shares one distance, and the defect's parts are whole columns.
    """
    size, deep = sev.values()
    if size == 0 or len(v) == 0:
        return
    mid = np.flatnonzero(np.abs(depth - 0.5) <= 0.25)
    centre = int(cv.rng.choice(mid)) if len(mid) else int(cv.rng.integers(len(v)))
    offset = v.xyz - v.xyz[centre]
    dist = np.linalg.norm(offset, axis=1)
    local = _smallest(dist, max(32, len(v) // 20))
    x = offset[local] - offset[local].mean(0)
    grad = np.linalg.lstsq(x, depth[local] - depth[local].mean(), rcond=None)[0]
    across = offset @ (grad / max(float(np.linalg.norm(grad)), 1e-12))  # mm along the surface normal
    along = np.sqrt(np.maximum(dist ** 2 - across ** 2, 0.0))
    # Ties (one surface position) break towards the joint surface, so a cut never leaves a floating layer.
    along = along - 1e-3 * depth
    patch = _smallest(along, _fraction(len(v), CARTILAGE_AREA[size]))
    lost = patch[depth[patch] >= PARTIAL_DEPTH]
    if FULL_THICKNESS_SHARE[deep] > 0:
        full = patch[_smallest(along[patch], _fraction(len(patch), FULL_THICKNESS_SHARE[deep]))]
        lost = np.union1d(lost, full)
    elif len(lost) == 0:  # voxels coarser than the cartilage: keep the defect visible, never down to bone
        lost = patch[_smallest(-depth[patch], 1)]
    cv.lesion(qid, v.take(lost), FLUID)


def _draw_fluid_blob(cv: _Canvas, qid: int, v: _Vox, centre: Sequence[float], frac: float,
                     tissue: int = FLUID) -> np.ndarray:
    """The ``frac`` of the region's voxels nearest ``centre``; returns their indices into ``v``."""
    idx = _smallest(np.linalg.norm(v.xyz - np.asarray(centre), axis=1), _fraction(len(v), frac))
    cv.lesion(qid, v.take(idx), tissue)
    return idx


# --- painters (their priority is their order in _PAINTERS) ------------------------------------------------

def _paint_ligaments(cv: _Canvas, k: _Knee) -> None:
    # Cruciates: femoral origin in the notch, tibial insertion with its bony footprint (part of the label,
    # so a BML/cyst at the insertion stays inside the ligament's region).
    cruciates = {
        "ACL": (np.array([-6.0, k.zc + 9.0, k.yc + 13.0]), np.array([-2.0, k.z_tb + 0.5, k.yt - 7.0]),
                max(3.5, k.thin), np.array([-2.0, k.z_tb + 4.0, k.yt - 7.0]), (4.5, 4.0, 5.5)),
        "PCL": (np.array([7.0, k.zc + 6.0, k.yc - 6.0]), np.array([0.0, k.z_tb + 7.0, k.yt + 21.0]),
                max(4.5, k.thin), np.array([0.0, k.z_tb + 9.0, k.yt + 19.0]), (4.5, 4.0, 4.0)),
    }
    ids = _label_ids()
    for name, (p1, p2, radius, foot_c, foot_semi) in cruciates.items():
        qid, sev = cv.grades("ligament_tendon", name)
        repaired = sev.get("ACL Repair", 0) == 1
        if repaired:
            radius *= 1.3  # grafts are thicker and straight
        foot_semi = np.maximum(foot_semi, k.thin)
        lo = np.minimum(np.minimum(p1, p2) - radius, foot_c - foot_semi) - 1
        hi = np.maximum(np.maximum(p1, p2) + radius, foot_c + foot_semi) + 1
        g = cv.grid(lo, hi)
        if g is None:
            continue
        t, dist = _segment(g, p1, p2)
        fibres = (t >= 0) & (t <= 1) & (dist <= radius)
        foot = _ellipsoid(g, foot_c, foot_semi) <= 1
        v = cv.claim(g, fibres | foot)
        is_fibre = fibres[v.nz]
        cv.put(v, ids[name], np.where(is_fibre, FIBROUS, MARROW))
        tv, dv = t[v.nz], dist[v.nz]
        length = float(np.linalg.norm(p2 - p1))
        if sev["Complete Tear"]:
            gap = np.abs(tv - 0.5) * length - max(2.5, k.thin)
            sel = np.flatnonzero(is_fibre)
            cv.lesion(qid, v.take(sel[_inside_or_nearest(gap[sel])]), FLUID)
        bone = np.flatnonzero(~is_fibre)
        if len(bone) and sev["Associated with BML/cyst at site of insertion or origin"]:
            _draw_fluid_blob(cv, qid, v.take(bone), foot_c, 0.6, EDEMA)
        if repaired and len(bone):
            # Bone tunnel along the graft's axis with the dark susceptibility artifact of its fixation.
            tunnel = dv[bone] - max(0.55 * radius, k.thin)
            cv.lesion(qid, v.take(bone[_inside_or_nearest(tunnel)]), CORTEX)

    # Patellar tendon: flat band from the lower patellar pole to the tibial tuberosity.
    p1, p2 = k.tendon
    half_w, half_t = k.tendon_half
    g = cv.grid(np.minimum(p1, p2) - (half_w + 1, half_t + 1, half_t + 1),
                np.maximum(p1, p2) + (half_w + 1, half_t + 1, half_t + 1))
    if g is None:
        return
    t, dist = _segment(g, p1, p2)
    # In the sagittal plane the band's thickness is the distance from the axis minus the m offset.
    across = np.sqrt(np.maximum(dist ** 2 - g.m ** 2, 0.0))
    r = np.sqrt((g.m / half_w) ** 2 + (across / half_t) ** 2)
    v = cv.claim(g, (t >= 0) & (t <= 1) & (r <= 1))
    cv.put(v, ids["patellar tendon"], FIBROUS)
    qid, sev = cv.grades("ligament_tendon", "patellar tendon")
    if sev["Signal Abnormality"] and len(v):
        score = np.maximum(t[v.nz] - 0.4, r[v.nz] - 0.6)  # proximal core: jumper's knee
        cv.lesion(qid, v.take(_inside_or_nearest(score)), EDEMA)


def _meniscus_coords(g: _Grid, k: _Knee, comp: str, shift_body: float, shift_ant: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(r, phi_deg, r_static, phi_static) of a compartment's meniscal ring; r = 1 at the outer rim.

    Extrusion is a smooth displacement field: the body moves outward and the anterior horn forward, so the
    ring is evaluated at the voxel position minus the displacement at its angle.
    """
    p = _MENISCI[comp]
    u0 = p["sgn"] * (g.m - p["sgn"] * k.cond_m) / p["am"]
    v0 = (g.y - k.yc) / p["ay"]
    phi0 = np.arctan2(v0, u0)
    u = u0 - shift_body * np.clip(np.cos(phi0), 0.0, None) ** 2 / p["am"]
    v = v0 + shift_ant * np.clip(-np.sin(phi0), 0.0, None) ** 2 / p["ay"]
    return np.hypot(u, v), np.degrees(np.arctan2(v, u)), np.hypot(u0, v0), np.degrees(phi0)


def _paint_menisci(cv: _Canvas, k: _Knee) -> None:
    ids = _label_ids()
    for comp, p in _MENISCI.items():
        parts = MENISCUS_PARTS.values()
        _, hyper = cv.grades("meniscal_hypertrophy", f"{comp} meniscus body")
        hypertrophy = hyper["presence"] == 1
        _, ext_body = cv.grades("meniscal_extrusion", f"{comp} meniscus body")
        _, ext_ant = cv.grades("meniscal_extrusion", f"{comp} meniscus anterior horn")
        shift_body, shift_ant = k.extrusion_offsets(comp, ext_body["grade"], ext_ant["grade"])
        height = k.meniscus_height(comp, hypertrophy)
        r_in = p["r_in"] - (0.12 if hypertrophy else 0.0)
        centre = np.array([p["sgn"] * k.cond_m, k.z_men, k.yc])
        reach = max(shift_body, shift_ant) + 1.0
        g = cv.grid(centre - (p["am"] + reach, height + 1, p["ay"] + reach),
                    centre + (p["am"] + reach, 1.0, p["ay"] + reach))
        if g is None:
            continue
        r, phi, _, _ = _meniscus_coords(g, k, comp, shift_body, shift_ant)
        w = (r - r_in) / (1.0 - r_in)  # 0 at the inner edge, 1 at the rim
        h = height * (0.25 + 0.75 * np.clip(w, 0.0, 1.0))  # wedge: tallest at the rim
        ring = (w >= 0) & (r <= 1) & (phi >= p["lo"]) & (phi <= p["hi"]) & (g.z <= k.z_men) & (g.z >= k.z_men - h)
        v = cv.claim(g, ring)
        pv = phi[v.nz]
        root_deg = k.root_degrees(comp)
        root_start = p["hi"] - root_deg
        seg = np.digitize(pv, [-45.0, 45.0, root_start])  # 0 anterior horn, 1 body, 2 posterior horn, 3 root
        names = [f"{comp} meniscus {part}" for part in parts] + [f"{comp} meniscus posterior root"]
        cv.put(v, np.array([ids[n] for n in names], np.uint8)[seg], FIBROUS)
        wv, hz = w[v.nz], (k.z_men - g.z[v.nz]) / h[v.nz]  # hz: 0 on the tibia, 1 on top
        mean_r = 0.5 * (p["am"] + p["ay"])
        centres = [0.5 * (p["lo"] - 45.0), 0.0, 0.5 * (45.0 + root_start), p["hi"] - root_deg / 2]
        arc = np.radians(pv - np.asarray(centres)[seg]) * r[v.nz] * mean_r  # mm along the ring
        for s, name in enumerate(names[:3]):
            qid, sev = cv.grades("meniscal_morphology", name)
            sel = np.flatnonzero(seg == s)
            if sev["morphology"] and len(sel):
                thick = height * (0.25 + 0.75 * np.clip(wv[sel], 0, 1))
                width = (1.0 - r_in) * mean_r
                _draw_morphology(cv, qid, sev["morphology"], v.take(sel), wv[sel], hz[sel], arc[sel],
                                 thick, width, max(0.6, 0.35 * k.min_mm))
        qid, sev = cv.grades("meniscal_root_tear", names[3])
        sel = np.flatnonzero(seg == 3)
        if sev["presence"] and len(sel):
            cleft = np.abs(arc[sel]) - max(1.2, 0.45 * k.min_mm)
            cv.lesion(qid, v.take(sel[_inside_or_nearest(cleft)]), FLUID)


def _draw_morphology(cv: _Canvas, qid: int, code: int, v: _Vox, w: np.ndarray, hz: np.ndarray,
                     arc: np.ndarray, thick: np.ndarray, width: float, delta: float) -> None:
    """MOAKS meniscal morphology codes 1-8 as distinct patterns (score <= 0 marks the pattern)."""
    vertical = np.abs(w - 0.55) * width - delta  # longitudinal cleft along the ring
    horizontal = np.maximum(np.abs(hz - 0.5) * thick - delta, w - 0.8)
    radial = np.maximum(np.abs(arc) - delta, w - 0.75)
    patterns = {
        1: np.maximum.reduce([np.abs(w - 0.55) - 0.25, np.abs(hz - 0.5) - 0.2, np.abs(arc) - 6.0]),
        2: vertical,
        3: horizontal,
        4: radial,
        5: np.minimum.reduce([vertical, horizontal, radial]),  # complex: clefts in several planes
        6: w - 0.35,  # maceration: inner (free-edge) tissue missing
        7: w - 0.65,
        8: w - 0.9,
    }
    tissue = SIGNAL if code == 1 else FLUID
    cv.lesion(qid, v.take(_inside_or_nearest(patterns[code])), tissue)


def _paint_patella(cv: _Canvas, k: _Knee) -> None:
    c, a, tc = k.pat_c, k.pat_semi, k.tc_p
    g = cv.grid(c - a - tc - 1, c + a + tc + 1)
    if g is None:
        return
    rb, ro = _ellipsoid(g, c, a), _ellipsoid(g, c, a + tc)
    cart = (rb > 1) & (ro <= 1) & (g.y > c[2] + 0.15 * a[2]) & (np.abs(g.m) < 0.9 * a[0])
    depth = (rb - 1) / np.maximum(rb - ro, 1e-6)
    near = g.y > c[2]  # BMLs are subchondral: the posterior (articular) half
    _paint_subregions(cv, g, rb <= 1, cart, depth, near, ["patella medial", "patella lateral"],
                      lambda vx: (vx.xyz[:, 0] < 0).astype(np.intp))


def _paint_femur(cv: _Canvas, k: _Knee) -> None:
    a, tc = k.cond_semi, k.tc_f
    sm, sy = k.shaft_semi
    # Above the epiphysis the femur is a plain shaft (no subregions, no lesions): a cheap 2D test.
    g = cv.grid((-sm - 1, -95.0, k.ys - sy - 1), (sm + 1, k.z_epi_f + 1, k.ys + sy + 1))
    if g is not None:
        shaft = ((g.m / sm) ** 2 + ((g.y - k.ys) / sy) ** 2 <= 1) & (g.z <= k.z_epi_f)
        cv.put(cv.claim(g, shaft), _label_ids()["femur"], MARROW)
    # The epiphysis, one block per compartment (each holds one condyle and all of its subregions).
    for comp, sgn in (("medial", 1.0), ("lateral", -1.0)):
        m_lo, m_hi = sorted((0.0, sgn * (k.cond_m + a[0] + tc + 1)))
        g = cv.grid((m_lo, k.z_epi_f - 1, min(k.y_front, k.yc - a[2]) - tc - 1),
                    (m_hi, k.z_fb + tc + 1, k.yc + a[2] + tc + 1))
        if g is None:
            continue
        keep = (g.z > k.z_epi_f) & ((g.m >= 0) if sgn > 0 else (g.m < 0))
        cc = (sgn * k.cond_m, k.zc, k.yc)
        rb, ro = _ellipsoid(g, cc, a), _ellipsoid(g, cc, a + tc)
        rs = np.sqrt((g.m / sm) ** 2 + ((g.y - k.ys) / sy) ** 2)
        ros = np.sqrt((g.m / (sm + tc)) ** 2 + ((g.y - k.ys) / (sy + tc)) ** 2)
        bone = keep & ((rb <= 1) | ((rs <= 1) & (g.z <= k.zc + 2.0)))
        # Articular cartilage covers the condyle from the trochlea round to the posterior condyle (not its
        # side walls) and the trochlear surface of the shaft; the bone painted first keeps the overlaps.
        theta = np.degrees(np.arctan2(g.y - k.yc, g.z - k.zc))
        condyle = ((rb > 1) & (ro <= 1) & (np.abs(g.m - cc[0]) <= 0.85 * a[0])
                   & (theta > -100.0) & (theta < 125.0))
        trochlea = ((rs > 1) & (ros <= 1) & (g.y < k.ys) & (np.abs(g.m) < 22.0) & (g.z <= k.zc + 2.0))
        depth = np.minimum(np.where(condyle, (rb - 1) / np.maximum(rb - ro, 1e-6), np.inf),
                           np.where(trochlea, (rs - 1) / np.maximum(rs - ros, 1e-6), np.inf))
        _paint_subregions(cv, g, bone, keep & (condyle | trochlea), depth, rb >= 0.6,
                          [f"femur {comp} {part}" for part in ("trochlea", "central", "posterior")],
                          lambda vx: np.digitize(np.degrees(np.arctan2(vx.xyz[:, 2] - k.yc, vx.xyz[:, 1] - k.zc)),
                                                 [-40.0, 35.0]))


def _paint_tibia(cv: _Canvas, k: _Knee) -> None:
    tm, ty = k.tib_semi
    ids = _label_ids()
    # Below the epiphysis the tibia is a plain shaft with the tuberosity.
    g = cv.grid((-tm - 1, k.z_epi_t - 1, k.yt - ty - 1), (tm + 1, 95.0, k.yt + ty + 1))
    if g is not None:
        s = k.tibia_scale(g.z)
        shaft = ((g.m / (tm * s)) ** 2 + ((g.y - k.yt) / (ty * s)) ** 2 <= 1) | (_ellipsoid(g, *k.tuberosity) <= 1)
        cv.put(cv.claim(g, shaft & (g.z >= k.z_epi_t)), ids["tibia"], MARROW)
    # The epiphysis: lateral, subspinous and medial blocks, each holding whole subregions.
    parts = ("anterior", "central", "posterior")
    for stems, m_lo, m_hi in (([f"tibia lateral {p}" for p in parts], -tm - 1, -7.0),
                              (["tibia subspinous"], -7.0, 7.0),
                              ([f"tibia medial {p}" for p in parts], 7.0, tm + 1)):
        g = cv.grid((m_lo, k.z_tb - 10.0, k.yt - ty - 1), (m_hi, k.z_epi_t + 1, k.yt + ty + 1))
        if g is None:
            continue
        keep = (g.z < k.z_epi_t) & (g.m >= m_lo) & (g.m < m_hi)
        s = k.tibia_scale(g.z)
        spines = _ellipsoid(g, (0.0, k.z_tb, k.yt), (6.0, 5.0, 11.0)) <= 1
        bone = ((g.z >= k.z_tb) & (((g.m / (tm * s)) ** 2 + ((g.y - k.yt) / (ty * s)) ** 2) <= 1)
                | spines | (_ellipsoid(g, *k.tuberosity) <= 1))
        r0 = np.sqrt((g.m / tm) ** 2 + ((g.y - k.yt) / ty) ** 2)
        cart = ((g.z < k.z_tb) & (g.z >= k.z_tb - k.tc_t) & (r0 <= 0.9) & (np.abs(g.m) >= 8.0) & ~spines)
        _paint_subregions(cv, g, keep & bone, keep & cart, (k.z_tb - g.z) / k.tc_t, g.z < k.z_tb + 12.0, stems,
                          lambda vx: np.digitize((vx.xyz[:, 2] - k.yt) / ty, [-1 / 3, 1 / 3]) if len(stems) == 3
                          else np.zeros(len(vx), np.intp))


def _paint_subregions(cv: _Canvas, g: _Grid, bone: np.ndarray, cart: np.ndarray, depth: np.ndarray,
                      near: np.ndarray, stems: Sequence[str], part: Callable[[_Vox], np.ndarray]) -> None:
    """Paint marrow and cartilage of a block with subregion labels, then their BMLs and cartilage lesions.

    ``stems`` name the subregions ("femur medial central"); ``part(voxels)`` gives each voxel's index into
    ``stems``. Bone is painted first so that cartilage shells never claim voxels inside the bone.
    """
    ids = _label_ids()
    for tissue, sel, word, category in ((MARROW, bone, "bone", "bone_marrow_lesion"),
                                        (CARTILAGE, cart, "cartilage", "cartilage")):
        v = cv.claim(g, sel)
        if len(v) == 0:
            continue
        which = part(v)
        names = [f"{stem} {word}" for stem in stems]
        cv.put(v, np.array([ids[n] for n in names], np.uint8)[which], tissue)
        for j, name in enumerate(names):
            idx = np.flatnonzero(which == j)
            if len(idx) == 0:
                continue
            qid, sev = cv.grades(category, name)
            if tissue == CARTILAGE:
                _draw_cartilage(cv, qid, sev, v.take(idx), depth[v.nz][idx])
            else:
                _draw_bml(cv, qid, sev, v.take(idx), near[v.nz][idx])


def _osteophyte_sites(k: _Knee) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label name, anchor on the bone margin, outward direction) of the 12 osteophyte sites."""
    sites = []
    # Pole spurs point forward along the tendons, away from the suprapatellar recess and the fat pad.
    for part, d in (("superior", (0, -1, -0.3)), ("inferior", (0, 1, -0.3)),
                    ("medial", (1, 0, 0.45)), ("lateral", (-1, 0, 0.45))):
        sites.append((f"patella {part} osteophyte site", *_surface(k.pat_c, k.pat_semi, d)))
    for comp, sgn in (("medial", 1.0), ("lateral", -1.0)):
        centre = (sgn * k.cond_m, k.zc, k.yc)
        for part, d in (("anterior", (0.6, -0.5, -0.9)), ("central", (1.0, 0.55, 0.0)),
                        ("posterior", (0.5, -0.4, 1.0))):
            sites.append((f"femur {comp} {part} osteophyte site",
                          *_surface(centre, k.cond_semi, (sgn * d[0], d[1], d[2]))))
        anchor = np.array([sgn * 0.98 * k.tib_semi[0], k.z_tb + 1.5, k.yt])
        sites.append((f"tibia {comp} osteophyte site", anchor, _unit((sgn, -0.35, 0.0))))
    return sites


def _paint_osteophytes(cv: _Canvas, k: _Knee) -> None:
    ids, u = _label_ids(), k.unit
    for name, anchor, normal in _osteophyte_sites(k):
        # The site is a soft-tissue cap over the margin, big enough for the largest spur (3 units).
        centre, along, across = anchor + normal * 1.55 * u, 2.05 * u, 2.4 * u
        g = cv.grid(*_box(centre, max(along, across) + 1))
        if g is None:
            continue
        rel = (g.m - centre[0], g.z - centre[1], g.y - centre[2])
        s = rel[0] * normal[0] + rel[1] * normal[1] + rel[2] * normal[2]
        perp2 = np.maximum(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - s ** 2, 0.0)
        v = cv.claim(g, (s / along) ** 2 + perp2 / across ** 2 <= 1)
        cv.put(v, ids[name], MUSCLE)
        qid, sev = cv.grades("osteophyte", name)
        grade = sev["grade"]
        if grade == 0 or len(v) == 0:
            continue
        length = grade * u
        rel = v.xyz - anchor
        along_s = rel @ normal
        perp = np.linalg.norm(rel - along_s[:, None] * normal, axis=1)
        spur = np.sqrt(((along_s - length / 2) / (length / 2)) ** 2 + (perp / (0.45 * length + 0.5 * u)) ** 2)
        idx = _inside_or_nearest(spur - 1.0, at_least=grade)
        # Marrow inside a dark cortical rim, like the bone it grows from.
        rim = spur[idx] > 0.55
        cv.lesion(qid, v.take(idx[~rim]), MARROW)
        cv.lesion(qid, v.take(idx[rim]), CORTEX)


def _paint_parameniscal(cv: _Canvas, k: _Knee) -> None:
    ids = _label_ids()
    for comp, p in _MENISCI.items():
        name = f"{comp} parameniscal site"
        height = k.meniscus_height(comp, True)
        centre = np.array([p["sgn"] * k.cond_m, k.z_men, k.yc])
        g = cv.grid(centre - (1.6 * p["am"], height + 1, 1.6 * p["ay"]),
                    centre + (1.6 * p["am"], k.tc_t + 4.0, 1.6 * p["ay"]))
        if g is None:
            continue
        _, _, r0, phi0 = _meniscus_coords(g, k, comp, 0.0, 0.0)
        site = ((r0 >= 1.02) & (r0 <= 1.55) & (np.abs(phi0) <= 135.0)
                & (g.z >= k.z_men - height) & (g.z <= k.z_tb + 3.0))
        v = cv.claim(g, site)
        cv.put(v, ids[name], MUSCLE)
        qid, sev = cv.grades("meniscal_cyst", name)
        if sev["presence"] and len(v):
            # Next to the torn segment (tear_location 0 anterior horn, 1 body, 2 posterior horn); beside the
            # body when the cyst has no tear (3).
            phi = np.radians((-80.0, 0.0, 80.0, 0.0)[sev["tear_location"]])
            cyst = centre + (p["sgn"] * p["am"] * 1.3 * np.cos(phi), -height / 2, p["ay"] * 1.3 * np.sin(phi))
            dist = np.linalg.norm(v.xyz - cyst, axis=1) - max(4.0, 1.2 * k.min_mm)
            cv.lesion(qid, v.take(_inside_or_nearest(dist)), FLUID)


def _paint_effusion(cv: _Canvas, k: _Knee) -> None:
    qid, sev = cv.grades("effusion_synovitis", "joint fluid")
    grade = sev["grade"]
    depth = max(EFFUSION_THICKNESS_MM[grade], 2 * k.thin)
    # Suprapatellar recess: between the quadriceps and the anterior femur, growing with the effusion.
    centre = np.array([0.0, k.pat_c[1] - k.pat_semi[1] - 2.0 - 3.0 * grade, k.y_front - depth / 2 - 0.3])
    semi = np.array([14.0 + 3.0 * grade, 9.0 + 4.0 * grade, depth / 2])
    g = cv.grid(*_box(centre, semi + 1))
    if g is None:
        return
    v = cv.claim(g, _ellipsoid(g, centre, semi) <= 1)
    cv.put(v, _label_ids()["joint fluid"], FLUID)
    if grade and len(v):
        cv.lesion(qid, v, FLUID)


def _paint_hoffa(cv: _Canvas, k: _Knee) -> None:
    centre = np.array([0.0, k.pat_c[1] + k.pat_semi[1] + 6.0, k.y_front - 7.0])
    semi = np.array([16.0, 11.0, 8.0])
    g = cv.grid(*_box(centre, semi + 1))
    if g is None:
        return
    v = cv.claim(g, _ellipsoid(g, centre, semi) <= 1)
    cv.put(v, _label_ids()["Hoffa fat pad"], FATPAD)
    qid, sev = cv.grades("hoffa_synovitis", "Hoffa fat pad")
    if sev["grade"] and len(v):
        # Synovitis spreads from the deep (posterior, synovial) border of the fat pad.
        idx = _smallest(-v.xyz[:, 2], _fraction(len(v), HOFFA_FRACTION[sev["grade"]]))
        cv.lesion(qid, v.take(idx), EDEMA)


def _paint_periarticular(cv: _Canvas, k: _Knee) -> None:
    ids = _label_ids()
    # Deep infrapatellar bursa: in the gap between the distal tendon and the tibia above the tuberosity.
    (_, z1, y1), (_, z2, y2) = k.tendon
    z_bursa = k.z_tb + 16.0
    slope = (y2 - y1) / (z2 - z1)
    tendon_back = y1 + (z_bursa - z1) * slope + k.tendon_half[1] * np.sqrt(1.0 + slope ** 2)
    gap = k.tibia_front(z_bursa) - tendon_back
    bursa_y, bursa_half = 0.5 * (tendon_back + k.tibia_front(z_bursa)), max(0.4 * gap, k.thin)
    notch_top, notch_bottom = k.zc + 2.0, k.z_tb - 5.0
    sites = {  # label: (centre, semi-axes, tissue)
        "popliteal fossa site": ((10.0, k.zc + 8.0, k.yc + k.cond_semi[2] + k.tc_f + 9.0), (11.0, 15.0, 7.0), FAT),
        "pes anserine bursa site": ((33.0, k.z_tb + 24.0, k.yt + 10.0), (6.0, 11.0, 8.0), FAT),
        "infrapatellar bursa site": ((0.0, z_bursa, bursa_y), (8.0, 5.0, bursa_half), FAT),
        "prepatellar bursa site": ((0.0, k.pat_c[1], k.pat_c[2] - k.pat_semi[2] - 4.0),
                                   (14.0, 15.0, max(1.8, k.thin)), FAT),
        "intercondylar notch site": ((0.0, 0.5 * (notch_top + notch_bottom), k.yc + 6.0),
                                     (5.5, 0.5 * (notch_bottom - notch_top), 12.0), FAT),
        "iliotibial band": ((-43.0, k.zc + 5.0, 0.0), (max(4.5, k.min_mm), 26.0, 9.0), FIBROUS),
    }
    for name, (centre, semi, tissue) in sites.items():
        centre, semi = np.asarray(centre), np.asarray(semi)
        g = cv.grid(*_box(centre, semi + 1))
        if g is None:
            continue
        v = cv.claim(g, _ellipsoid(g, centre, semi) <= 1)
        if name == "iliotibial band":
            # The band is the outer (lateral) half; the deep half is the fat where friction edema shows.
            deep = v.xyz[:, 0] > centre[0]
            cv.put(v, ids[name], np.where(deep, FAT, FIBROUS))
            qid, sev = cv.grades("periarticular", name)
            if sev["presence"]:
                sel = np.flatnonzero(deep) if np.any(deep) else np.arange(len(v))
                score = np.abs(v.xyz[sel, 1] - centre[1]) - 12.0
                cv.lesion(qid, v.take(sel[_inside_or_nearest(score)]), EDEMA)
            continue
        cv.put(v, ids[name], tissue)
        if len(v) == 0:
            continue
        if name == "intercondylar notch site":
            _draw_notch(cv, k, v, centre, semi)
            continue
        qid, sev = cv.grades("periarticular", name)
        if sev["presence"]:
            _draw_fluid_blob(cv, qid, v, centre, 0.55)


def _draw_notch(cv: _Canvas, k: _Knee, v: _Vox, centre: np.ndarray, semi: np.ndarray) -> None:
    """Ganglion cyst (posterior notch, fluid) and loose body (anterior notch, dark core in fluid)."""
    schema = load_schema()
    by_key = {schema[q].finding_key: q for q in schema}
    ganglion, loose = by_key["ganglion_cyst_presence"], by_key["loose_bodies_presence"]
    free = np.ones(len(v), bool)
    if cv.severities.get(ganglion, {}).get("presence", 0):
        idx = _draw_fluid_blob(cv, ganglion, v, centre + (0.0, -0.3 * semi[1], 0.5 * semi[2]), 0.3)
        free[idx] = False
    if cv.severities.get(loose, {}).get("presence", 0) and np.any(free):
        sel = np.flatnonzero(free)
        dist = np.linalg.norm(v.xyz[sel] - (centre + (0.0, 0.3 * semi[1], -0.5 * semi[2])), axis=1)
        idx = _smallest(dist, _fraction(len(v), 0.15))
        core = _smallest(dist[idx], _fraction(len(idx), 0.45))
        halo = np.setdiff1d(np.arange(len(idx)), core)
        cv.lesion(loose, v.take(sel[idx[core]]), CORTEX)
        if len(halo):
            cv.lesion(loose, v.take(sel[idx[halo]]), FLUID)


def _paint_soft_tissue(cv: _Canvas, k: _Knee) -> None:
    """Unlabelled tissue: quadriceps tendon, then the leg (muscle inside a fat layer), then air."""
    p1 = np.array([0.0, k.pat_c[1] - k.pat_semi[1] + 2.0, k.pat_c[2] - 3.0])
    p2 = np.array([0.0, k.pat_c[1] - 90.0, k.pat_c[2] - 6.0])
    g = cv.grid(np.minimum(p1, p2) - 15, np.maximum(p1, p2) + 15)
    if g is not None:
        t, dist = _segment(g, p1, p2)
        across = np.sqrt(np.maximum(dist ** 2 - g.m ** 2, 0.0))
        band = (t >= 0) & (t <= 1) & ((g.m / 14.0) ** 2 + (across / max(4.0, k.thin)) ** 2 <= 1)
        v = cv.claim(g, band)
        cv.put(v, 0, FIBROUS)
    # The leg spans the whole field of view; slabs of sagittal slices bound the temporary arrays.
    step = max(1, 2_000_000 // (cv.shape[1] * cv.shape[2]))
    for start in range(0, cv.shape[0], step):
        g = cv.block((slice(start, min(start + step, cv.shape[0])), slice(0, cv.shape[1]), slice(0, cv.shape[2])))
        r = np.sqrt((g.m / 52.0) ** 2 + ((g.y - 6.0) / 60.0) ** 2)
        free = cv.tissue[g.sl] == 0
        tissue = np.where(r <= 1.0 - 6.0 / 55.0, MUSCLE, np.where(r <= 1.0, FAT, AIR)).astype(np.uint8)
        cv.tissue[g.sl][free] = tissue[free]


_PAINTERS = (_paint_menisci, _paint_ligaments, _paint_patella, _paint_femur, _paint_tibia, _paint_osteophytes,
             _paint_parameniscal, _paint_effusion, _paint_hoffa, _paint_periarticular, _paint_soft_tissue)
"""Painting order = priority: a voxel belongs to the first structure that claims it."""


class LabelsLostError(RuntimeError):
    """A pose put a labelled structure outside the field of view (or the voxels are too coarse for it)."""


# --- the rendered volume ---------------------------------------------------------------------------------

def label_boxes(labels: np.ndarray) -> dict[int, list[int]]:
    """Inclusive voxel box (``boxes`` convention) of every label present, in one pass over the mask."""
    out = {}
    for label, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            out[label] = [v for s in sl for v in (s.start, s.stop - 1)]
    return out


def union_box(boxes: Sequence[Sequence[int]]) -> list[int]:
    """Smallest box holding all ``boxes``."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 6)
    return [int(b[:, i].min()) if i % 2 == 0 else int(b[:, i].max()) for i in range(6)]


@dataclass
class Phantom:
    """One synthetic scan: image, label mask, affine, and the lesion voxels drawn for each question."""
    image: np.ndarray
    """int16 (S, H, W)."""
    labels: np.ndarray
    """uint8 (S, H, W), ids of ``label_names()``."""
    affine: np.ndarray
    """4x4 voxel -> RAS mm."""
    lesions: dict[int, np.ndarray]
    """Question id -> sorted flat indices of the voxels its lesion changed (absent when normal)."""

    def question_box(self, question_id: int, boxes: Optional[Mapping[int, Sequence[int]]] = None) -> list[int]:
        """Box of the question's region (union of its labels); ``boxes`` = precomputed ``label_boxes``."""
        boxes = label_boxes(self.labels) if boxes is None else boxes
        present = [boxes[i] for i in question_labels(question_id) if i in boxes]
        if not present:
            names = [label_names()[i] for i in question_labels(question_id)]
            raise ValueError(f"question {question_id}: none of its labels {names} is in the mask")
        return union_box(present)


def render_phantom(shape: Sequence[int], anatomy: Anatomy, severities: Mapping[int, Mapping[str, int]],
                   rng: np.random.Generator) -> Phantom:
    """Render one scan of ``shape`` (S, H, W). ``severities``: question id -> {field: grade}; questions left
    out are normal. ``rng`` places the lesions and draws the noise. Raises ``LabelsLostError`` when a
    label has no voxel (rare extreme poses, or shapes coarser than about (16, 32, 32))."""
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) < 8:
        raise ValueError(f"phantom shape {tuple(shape)}: expected three sizes (S, H, W), each at least 8")
    cv = _Canvas(shape_t, anatomy, severities, rng)  # type: ignore[arg-type]
    knee = _Knee(anatomy, cv.min_mm)
    for paint in _PAINTERS:
        paint(cv, knee)
    counts = np.bincount(cv.labels.ravel(), minlength=len(label_names()) + 1)
    missing = [name for i, name in label_names().items() if counts[i] == 0]
    if missing:
        raise LabelsLostError(f"phantom of shape {shape_t} ({anatomy.side} knee, scale {anatomy.scale}, shift "
                              f"{anatomy.shift_mm} mm) lost labels {missing}: outside the field of view or "
                              f"thinner than a voxel")
    lesions = {q: np.unique(np.concatenate(parts)) for q, parts in sorted(cv.lesions.items())}
    return Phantom(_image(cv.tissue, anatomy, rng), cv.labels, volume_affine(shape_t, anatomy.side), lesions)


def _image(tissue: np.ndarray, anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Tissue classes -> int16 intensities: per-tissue contrast, smooth bias field, Rician noise."""
    lut = (_INTENSITY * np.asarray(anatomy.tissue_gain, np.float32) * anatomy.gain).astype(np.float32)
    img = lut[tissue]
    for axis, n in enumerate(tissue.shape):
        x = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        lin, quad = anatomy.bias[2 * axis: 2 * axis + 2]
        # A separable field costs one broadcast multiply per axis instead of a full 3D evaluation.
        img *= np.exp(lin * x + quad * x * x).astype(np.float32).reshape([-1 if i == axis else 1 for i in range(3)])
    sigma = np.float32(anatomy.noise * anatomy.gain)
    # Tens of millions of normals: SFC64 draws them about twice as fast as the default PCG64.
    noise_rng = np.random.Generator(np.random.SFC64(rng.integers(2 ** 63)))
    noise = noise_rng.standard_normal(tissue.shape, dtype=np.float32)
    noise *= sigma
    img += noise
    img *= img
    noise_rng.standard_normal(tissue.shape, dtype=np.float32, out=noise)
    noise *= sigma
    noise *= noise
    img += noise
    np.sqrt(img, out=img)  # magnitude of a complex signal with Gaussian noise: Rician
    np.rint(img, out=img)
    np.clip(img, 0, np.iinfo(np.int16).max, out=img)
    return img.astype(np.int16)
