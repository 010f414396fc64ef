"""Procedural chest CT phantoms in Hounsfield units.

:func:`sample_anatomy` draws one patient (a frozen :class:`ChestAnatomy`), :func:`render_slices`
renders ``n_slices`` axial slices of that patient over the patient's slab of the chest.

Conventions: ``x`` in mm, patient's left towards the image right (radiological display);
``y`` in mm, posterior towards the image bottom (row index grows with y); the slice centre is
the origin. Along the body axis a normalised chest coordinate ``ζ`` runs from 0 (lung apex) to
1 (diaphragm / upper abdomen); ``ζ·chest_length_mm`` is the position in mm. Every shape
parameter is a smooth function of ``ζ`` (lungs widen downwards, the heart and the liver /
spleen domes grow in, vessels and ribs drift, structures fade in and out with continuous size),
so slices of one patient vary smoothly along z.

Rendering draws tissue layers painter-style on a grid supersampled ``SUPERSAMPLE``× per axis and
block-averages (antialiasing / partial volume). Large axis-aligned superellipses are separable
(``|x/a|^p + |y/b|^p`` is a sum of a row and a column vector), small shapes are evaluated inside
their bounding boxes only, and textures are smooth random fields upsampled from a coarse grid by
separable linear-interpolation gathers, which keeps a 256² slice at ~10–20 ms.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

__all__ = [
    "SUPERSAMPLE",
    "Tube",
    "Rib",
    "Lesion",
    "ChestAnatomy",
    "sample_anatomy",
    "slice_positions",
    "render_slices",
]

SUPERSAMPLE = 2
AIR_HU = -1000.0
#: A shape on the supersampled grid: the slices of its bounding box and its mask inside them.
Shape = tuple[tuple[slice, slice], np.ndarray]


@dataclass(frozen=True)
class Tube:
    """A tube (lung vessel or airway) crossing the slab, in the normalised frame of one lung.

    ``u`` is medial-positive (``u = 1`` at the lung's medial edge), ``v`` posterior-positive, both
    in units of the lung semi-axes at the current ``ζ``; the section is an ellipse of semi-axes
    ``radius_mm`` and ``radius_mm·elong`` rotated by ``angle``; it moves by ``(du, dv)`` per unit
    ``ζ`` and exists for ``|ζ − z_center| < z_half`` (radius tapers to 0 at the ends).
    ``wall_mm > 0`` marks an airway (air lumen inside a soft-tissue wall).
    """

    side: int  # -1: patient's right (image left), +1: patient's left
    u: float
    v: float
    du: float
    dv: float
    radius_mm: float
    elong: float
    angle: float
    z_center: float
    z_half: float
    wall_mm: float = 0.0


@dataclass(frozen=True)
class Rib:
    """A rib cross-section on the chest-wall contour at polar angle ``theta`` (0: posterior)."""

    side: int
    theta: float  # rad from the posterior midline, at ζ = 0.5
    drift: float  # rad per unit ζ
    a_mm: float  # semi-axis along the contour
    b_mm: float  # semi-axis across the contour
    cortical_mm: float


@dataclass(frozen=True)
class Lesion:
    """A small ellipsoidal lesion.

    ``kind``: ``"liver"`` / ``"heart"`` (``u, v`` in the organ's normalised frame), ``"wall"``
    (chest-wall muscle: ``u`` = polar angle in rad, ``v`` = depth fraction in the muscle layer),
    ``"lung"`` (solid nodule; ``u, v`` in the lung frame like :class:`Tube`).
    ``hu`` is an additive contrast for soft-tissue lesions and the absolute value for nodules.
    """

    kind: str
    side: int
    u: float
    v: float
    z_center: float
    radius_mm: float
    z_half_mm: float
    hu: float


@dataclass(frozen=True)
class ChestAnatomy:
    """Per-patient chest parameters (lengths in mm, attenuation in HU, angles in rad)."""

    # slab and z
    chest_length_mm: float
    z_start: float
    z_end: float
    # body habitus: thoracic cavity (inside the ribs) and the layers around it
    cavity_a_mm: float
    cavity_b_mm: float
    cavity_p: float
    center_dy_mm: float
    taper: float  # relative change of lateral size per unit ζ
    muscle_lat_mm: float
    muscle_front_mm: float
    muscle_back_mm: float
    fat_lat_mm: float
    fat_front_mm: float
    fat_back_mm: float
    body_p: float
    fat_hu: float
    muscle_hu: float
    mediastinal_fat_hu: float
    # lungs
    lung_hu: float
    lung_gradient_hu: float  # denser posteriorly (dependent lung)
    lung_texture_hu: float
    lung_sep_mm: float  # half-width of the mediastinum between the lungs
    lung_asym: float  # right lung relative width
    lung_p: float
    # heart and great vessels
    heart_a_mm: float
    heart_b_mm: float
    heart_angle: float
    heart_dx_mm: float
    heart_dy_mm: float
    heart_z0: float
    pericardial_fat_mm: float
    blood_hu: float
    aorta_r_mm: float
    asc_aorta_r_mm: float
    pulmonary_r_mm: float
    arch_z: float
    trachea_r_mm: float
    carina_z: float
    esophagus_r_mm: float
    # spine
    vb_a_mm: float
    vb_b_mm: float
    cortical_mm: float
    canal_r_mm: float
    cancellous_hu: float
    cortical_hu: float
    disc_hu: float
    vertebra_height_mm: float
    vertebra_phase: float
    # ribs, sternum, scapulae
    ribs: tuple[Rib, ...]
    rib_cortical_hu: float
    rib_marrow_hu: float
    cartilage_hu: float
    cartilage_theta: float
    sternum_a_mm: float
    sternum_b_mm: float
    scapula_len_mm: float
    scapula_z: float
    # abdomen domes
    liver_z: float
    liver_hu: float
    spleen_hu: float
    # lungs' contents
    vessels: tuple[Tube, ...]
    airways: tuple[Tube, ...]
    lesions: tuple[Lesion, ...]

    @property
    def body_width_mm(self) -> float:
        """Lateral body width at ζ = 0.5."""
        return 2.0 * (self.cavity_a_mm + self.muscle_lat_mm + self.fat_lat_mm)

    @property
    def body_depth_mm(self) -> float:
        """Anterior–posterior body depth at ζ = 0.5."""
        return (
            2.0 * self.cavity_b_mm
            + self.muscle_front_mm
            + self.muscle_back_mm
            + self.fat_front_mm
            + self.fat_back_mm
        )


# ---------------------------------------------------------------------------------- sampling
def _tubes(
    rng: np.random.Generator, n: int, *, airway: bool, z_lo: float, z_hi: float
) -> tuple[Tube, ...]:
    out = []
    for _ in range(n):
        side = int(rng.choice([-1, 1]))
        if airway:
            rho = rng.uniform(0.05, 0.75)  # distance from the hilum (normalised)
        else:
            rho = rng.uniform(0.0, 1.0) ** 0.8
        phi = rng.uniform(-math.pi / 2, math.pi / 2) + (0 if rng.random() < 0.85 else math.pi)
        hilum = (0.72, -0.05)
        u = hilum[0] - 1.35 * rho * math.cos(phi)
        v = hilum[1] + 0.95 * rho * math.sin(phi)
        r_norm = math.hypot(u, v)
        if r_norm > 0.9:  # keep inside the unit disc of the lung frame
            u, v = 0.9 * u / r_norm, 0.9 * v / r_norm
        near = max(0.0, 1.0 - rho)
        if airway:
            radius = 1.5 + 4.5 * near**1.5 + rng.uniform(-0.3, 0.5)
            wall = 0.6 + 0.12 * radius
        else:
            radius = 0.7 + 5.5 * near**2.2 + rng.uniform(-0.2, 0.6)
            wall = 0.0
        elong = 1.0 + rng.exponential(0.6) if rng.random() < 0.5 else 1.0 + rng.uniform(0.0, 0.3)
        angle = math.atan2(v - hilum[1], u - hilum[0]) + rng.normal(0.0, 0.3)
        out.append(
            Tube(
                side=side,
                u=u,
                v=v,
                du=rng.normal(0.0, 0.12),
                dv=rng.normal(0.0, 0.12),
                radius_mm=float(max(radius, 0.6)),
                elong=float(min(elong, 4.0)),
                angle=float(angle),
                z_center=float(rng.uniform(z_lo - 0.1, z_hi + 0.1)),
                z_half=float(rng.uniform(0.12, 0.6)),
                wall_mm=float(wall),
            )
        )
    return tuple(out)


def sample_anatomy(rng: np.random.Generator) -> ChestAnatomy:
    """Draw one patient's chest anatomy (slim to obese, small to large frames)."""
    habitus = rng.beta(1.6, 1.6)  # 0: slim, 1: obese
    frame = rng.uniform(0.0, 1.0)  # skeletal size
    cav_a = 110.0 + 38.0 * frame + rng.normal(0.0, 3.0)
    cav_b = cav_a * rng.uniform(0.6, 0.76)
    mus_lat = rng.uniform(7.0, 16.0)
    mus_front = rng.uniform(7.0, 18.0)
    mus_back = rng.uniform(24.0, 40.0)
    fat_lat = 3.0 + 42.0 * habitus**1.2 + rng.uniform(-2.0, 2.0)
    fat_front = 3.0 + 36.0 * habitus**1.2 * rng.uniform(0.7, 1.3)
    fat_back = 2.0 + 22.0 * habitus**1.2 * rng.uniform(0.7, 1.3)
    # keep the body inside the 400 mm circle (lateral semi-axis <= 185 mm incl. taper)
    excess = cav_a * 1.06 + mus_lat + fat_lat - 185.0
    if excess > 0:
        fat_lat = max(3.0, fat_lat - excess)
    excess = cav_b + max(mus_back + fat_back, mus_front + fat_front) - 160.0
    if excess > 0:
        fat_front = max(3.0, fat_front - excess)
        fat_back = max(2.0, fat_back - excess)

    z_start = rng.uniform(0.12, 0.3)
    z_end = rng.uniform(0.78, 0.95)
    chest_length = rng.uniform(220.0, 300.0)

    n_rib = int(rng.integers(5, 9))
    ribs = []
    drift = rng.uniform(-0.35, 0.35)
    for side in (-1, 1):
        thetas = np.linspace(0.45, 2.55, n_rib) + rng.normal(0.0, 0.06, n_rib)
        for th in thetas:
            ribs.append(
                Rib(
                    side=side,
                    theta=float(th),
                    drift=float(drift + rng.normal(0.0, 0.05)),
                    a_mm=float(rng.uniform(5.5, 10.0)),
                    b_mm=float(rng.uniform(2.8, 4.5)),
                    cortical_mm=float(rng.uniform(1.0, 1.8)),
                )
            )

    vessels = _tubes(rng, int(rng.integers(40, 90)), airway=False, z_lo=z_start, z_hi=z_end)
    airways = _tubes(rng, int(rng.integers(6, 18)), airway=True, z_lo=z_start, z_hi=z_end)

    lesions = []
    for _ in range(int(rng.integers(3, 9))):
        kind = str(rng.choice(["liver", "heart", "wall"], p=[0.45, 0.25, 0.3]))
        radius = rng.uniform(1.5, 5.0)
        contrast = rng.uniform(10.0, 40.0)
        if kind == "liver":
            rho, phi = 0.75 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            u, v = rho * math.cos(phi), rho * math.sin(phi)
            z_c = rng.uniform(max(z_start, 0.8), max(z_end, 0.85) + 0.05)
            contrast *= float(rng.choice([-1.0, 1.0]))  # hypo- or hyperdense
        elif kind == "heart":
            rho, phi = 0.6 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            u, v = rho * math.cos(phi), rho * math.sin(phi)
            z_c = rng.uniform(max(z_start, 0.55), z_end)
        else:
            u, v = rng.uniform(0.6, 2.6), rng.uniform(0.35, 0.65)
            radius = min(radius, 0.45 * min(mus_lat, mus_front))
            z_c = rng.uniform(z_start, z_end)
        lesions.append(
            Lesion(
                kind=kind,
                side=int(rng.choice([-1, 1])),
                u=float(u),
                v=float(v),
                z_center=float(z_c),
                radius_mm=float(radius),
                z_half_mm=float(radius * rng.uniform(1.0, 2.5)),
                hu=float(contrast),
            )
        )
    for _ in range(int(rng.integers(0, 4))):
        rho, phi = 0.7 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        radius = rng.uniform(2.0, 6.0)
        lesions.append(
            Lesion(
                kind="lung",
                side=int(rng.choice([-1, 1])),
                u=float(rho * math.cos(phi)),
                v=float(rho * math.sin(phi)),
                z_center=float(rng.uniform(z_start, z_end)),
                radius_mm=float(radius),
                z_half_mm=float(radius * rng.uniform(1.0, 1.5)),
                hu=float(rng.uniform(10.0, 60.0)),
            )
        )

    return ChestAnatomy(
        chest_length_mm=float(chest_length),
        z_start=float(z_start),
        z_end=float(z_end),
        cavity_a_mm=float(cav_a),
        cavity_b_mm=float(cav_b),
        cavity_p=float(rng.uniform(2.0, 2.4)),
        center_dy_mm=float(rng.uniform(-12.0, 12.0)),
        taper=float(rng.uniform(0.0, 0.12)),
        muscle_lat_mm=float(mus_lat),
        muscle_front_mm=float(mus_front),
        muscle_back_mm=float(mus_back),
        fat_lat_mm=float(fat_lat),
        fat_front_mm=float(fat_front),
        fat_back_mm=float(fat_back),
        body_p=float(rng.uniform(2.0, 2.3) + 0.5 * habitus),
        fat_hu=float(rng.uniform(-120.0, -85.0)),
        muscle_hu=float(rng.uniform(35.0, 55.0)),
        mediastinal_fat_hu=float(rng.uniform(-110.0, -70.0)),
        lung_hu=float(rng.uniform(-885.0, -820.0)),
        lung_gradient_hu=float(rng.uniform(20.0, 70.0)),
        lung_texture_hu=float(rng.uniform(8.0, 20.0)),
        lung_sep_mm=float(rng.uniform(12.0, 24.0)),
        lung_asym=float(rng.uniform(1.0, 1.12)),
        lung_p=float(rng.uniform(2.0, 2.5)),
        heart_a_mm=float(cav_a * rng.uniform(0.38, 0.48)),
        heart_b_mm=float(cav_a * rng.uniform(0.28, 0.35)),
        heart_angle=float(rng.uniform(0.35, 0.75)),
        heart_dx_mm=float(cav_a * rng.uniform(0.12, 0.28)),
        heart_dy_mm=float(-cav_b * rng.uniform(0.1, 0.3)),
        heart_z0=float(rng.uniform(0.35, 0.5)),
        pericardial_fat_mm=float(2.0 + 6.0 * habitus + rng.uniform(0.0, 2.0)),
        blood_hu=float(rng.uniform(35.0, 50.0)),
        aorta_r_mm=float(rng.uniform(10.0, 15.0)),
        asc_aorta_r_mm=float(rng.uniform(13.0, 19.0)),
        pulmonary_r_mm=float(rng.uniform(11.0, 15.0)),
        arch_z=float(rng.uniform(0.22, 0.32)),
        trachea_r_mm=float(rng.uniform(7.5, 11.0)),
        carina_z=float(rng.uniform(0.4, 0.5)),
        esophagus_r_mm=float(rng.uniform(6.0, 9.0)),
        vb_a_mm=float(rng.uniform(14.0, 20.0)),
        vb_b_mm=float(rng.uniform(12.0, 16.0)),
        cortical_mm=float(rng.uniform(1.2, 2.2)),
        canal_r_mm=float(rng.uniform(6.5, 9.0)),
        cancellous_hu=float(rng.uniform(170.0, 320.0)),
        cortical_hu=float(rng.uniform(700.0, 1000.0)),
        disc_hu=float(rng.uniform(70.0, 110.0)),
        vertebra_height_mm=float(rng.uniform(22.0, 28.0)),
        vertebra_phase=float(rng.uniform(0.0, 1.0)),
        ribs=tuple(ribs),
        rib_cortical_hu=float(rng.uniform(650.0, 950.0)),
        rib_marrow_hu=float(rng.uniform(150.0, 280.0)),
        cartilage_hu=float(rng.uniform(90.0, 180.0)),
        cartilage_theta=float(rng.uniform(2.2, 2.45)),
        sternum_a_mm=float(rng.uniform(11.0, 18.0)),
        sternum_b_mm=float(rng.uniform(4.5, 7.0)),
        scapula_len_mm=float(rng.uniform(35.0, 55.0)),
        scapula_z=float(rng.uniform(0.45, 0.6)),
        liver_z=float(rng.uniform(0.7, 0.82)),
        liver_hu=float(rng.uniform(50.0, 70.0)),
        spleen_hu=float(rng.uniform(40.0, 55.0)),
        vessels=vessels,
        airways=airways,
        lesions=tuple(lesions),
    )


def slice_positions(anatomy: ChestAnatomy, n_slices: int) -> np.ndarray:
    """Normalised chest positions ``ζ`` of ``n_slices`` equally spaced slices over the slab."""
    if n_slices == 1:
        return np.array([(anatomy.z_start + anatomy.z_end) / 2.0])
    return np.linspace(anatomy.z_start, anatomy.z_end, n_slices)


# ---------------------------------------------------------------------------------- rendering
def _smoothstep(t: float) -> float:
    t = min(max(t, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def _cap(t: float) -> float:
    """Relative radius of a dome cut at relative depth t (0 at the top, 1 at full size)."""
    t = min(max(t, 0.0), 1.0)
    return math.sqrt(t * (2.0 - t))


class _Canvas:
    """Supersampled HU image with bounding-box painting helpers."""

    def __init__(self, size: int, fov_mm: float) -> None:
        self.n = size * SUPERSAMPLE
        self.g = fov_mm / self.n
        self.half = fov_mm / 2.0
        self.c = ((np.arange(self.n) + 0.5) * self.g - self.half).astype(np.float32)
        self.img = np.full((self.n, self.n), AIR_HU, dtype=np.float32)

    def box(self, cx: float, cy: float, rx: float, ry: float) -> tuple[slice, slice] | None:
        """Row and column slices of the grid cells the box (centre, half-widths, mm) touches."""
        c0 = max(0, int(math.floor((cx - rx + self.half) / self.g - 0.5)))
        c1 = min(self.n, int(math.ceil((cx + rx + self.half) / self.g + 0.5)) + 1)
        r0 = max(0, int(math.floor((cy - ry + self.half) / self.g - 0.5)))
        r1 = min(self.n, int(math.ceil((cy + ry + self.half) / self.g + 0.5)) + 1)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def superellipse(
        self, cx: float, cy: float, a: float, b: float, p: float
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Axis-aligned ``|x/a|^p + |y/b|^p <= 1`` (separable)."""
        if a <= 0 or b <= 0:
            return None
        sl = self.box(cx, cy, a, b)
        if sl is None:
            return None
        fx = np.abs((self.c[sl[1]] - cx) / a) ** p
        fy = np.abs((self.c[sl[0]] - cy) / b) ** p
        return sl, (fy[:, None] + fx[None, :]) <= 1.0

    def ellipse(
        self, cx: float, cy: float, a: float, b: float, angle: float = 0.0
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Rotated ellipse with semi-axes ``a`` (along ``angle``) and ``b``."""
        if a <= 0 or b <= 0:
            return None
        ca, sa = math.cos(angle), math.sin(angle)
        rx = math.sqrt((a * ca) ** 2 + (b * sa) ** 2)
        ry = math.sqrt((a * sa) ** 2 + (b * ca) ** 2)
        sl = self.box(cx, cy, rx, ry)
        if sl is None:
            return None
        dx = (self.c[sl[1]] - cx)[None, :]
        dy = (self.c[sl[0]] - cy)[:, None]
        u = (dx * ca + dy * sa) / a
        v = (dy * ca - dx * sa) / b
        return sl, u * u + v * v <= 1.0

    def capsule(
        self, x0: float, y0: float, x1: float, y1: float, r: float
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Points within ``r`` of the segment (x0, y0)-(x1, y1)."""
        if r <= 0:
            return None
        sl = self.box((x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2 + r, abs(y1 - y0) / 2 + r)
        if sl is None:
            return None
        px = (self.c[sl[1]] - x0)[None, :]
        py = (self.c[sl[0]] - y0)[:, None]
        vx, vy = x1 - x0, y1 - y0
        t = np.clip((px * vx + py * vy) / max(vx * vx + vy * vy, 1e-9), 0.0, 1.0)
        dx, dy = px - t * vx, py - t * vy
        return sl, dx * dx + dy * dy <= r * r

    def paint(self, shape: Shape | None, value: float | np.ndarray,
              where: np.ndarray | None = None) -> None:
        """Set ``value`` (scalar, or full-size array) inside ``shape`` (optionally ∧ ``where``)."""
        if shape is None:
            return
        sl, m = shape
        if where is not None:
            m = m & where[sl]
        sub = self.img[sl]
        if np.ndim(value) == 0:
            sub[m] = value
        else:
            sub[m] = value[sl][m]

    def full_mask(self, shape: Shape | None) -> np.ndarray:
        """A shape's mask on the whole grid."""
        out = np.zeros((self.n, self.n), dtype=bool)
        if shape is not None:
            out[shape[0]] = shape[1]
        return out

    def downsample(self) -> np.ndarray:
        """The image averaged over ``SUPERSAMPLE``² blocks: the phantom at its output size."""
        s = SUPERSAMPLE
        rows = self.img[0::s].copy()
        for k in range(1, s):
            rows += self.img[k::s]
        out = rows[:, 0::s].copy()
        for k in range(1, s):
            out += rows[:, k::s]
        return out * np.float32(1.0 / (s * s))


@functools.lru_cache(maxsize=16)
def _interp_weights(n_fine: int, n_coarse: int) -> tuple[np.ndarray, np.ndarray]:
    """Left coarse index and right weight for linear interpolation over the same extent."""
    t = (np.arange(n_fine) + 0.5) / n_fine * (n_coarse - 1)
    i0 = np.clip(np.floor(t).astype(np.intp), 0, n_coarse - 2)
    return i0, (t - i0).astype(np.float32)[:, None]


class _Texture:
    """Stationary smooth random field (unit SD) that changes smoothly with ζ.

    ``cos(a)·F0 + sin(a)·cos(b)·F1 + sin(a)·sin(b)·F2`` with ``a = ωζ`` and ``b = 1.618·ωζ``:
    unit-norm weights keep the variance constant and the two incommensurate phases avoid a
    periodic repetition of the texture along z.
    """

    def __init__(
        self, rng: np.random.Generator, n_fine: int, n_coarse: int, sigma: float, omega: float
    ) -> None:
        fields = rng.standard_normal((3, n_coarse, n_coarse))
        fields = scipy.ndimage.gaussian_filter(fields, sigma=(0, sigma, sigma), mode="wrap")
        fields /= fields.std(axis=(1, 2), keepdims=True)
        self.fields = fields.astype(np.float32)
        self.i0, self.w = _interp_weights(n_fine, n_coarse)
        self.omega = omega

    def __call__(self, zeta: float, sl: tuple[slice, slice]) -> np.ndarray:
        """Field at ``zeta`` on the fine-grid window ``sl`` (rows, cols).

        Separable linear interpolation by gathers (no BLAS: multithreaded BLAS is very slow on
        such small products).
        """
        a, b = self.omega * zeta, 1.618034 * self.omega * zeta
        w0, w1, w2 = math.cos(a), math.sin(a) * math.cos(b), math.sin(a) * math.sin(b)
        f = np.float32(w0) * self.fields[0] + np.float32(w1) * self.fields[1] + np.float32(w2) * self.fields[2]
        i0, w = self.i0[sl[0]], self.w[sl[0]]
        rows = f[i0] * (1.0 - w) + f[i0 + 1] * w  # (n_rows, n_coarse)
        j0, wc = self.i0[sl[1]], self.w[sl[1]][:, 0]
        return rows[:, j0] * (1.0 - wc) + rows[:, j0 + 1] * wc


def _superellipse_radius(a: float, b: float, p: float, sx: float, sy: float) -> float:
    """Distance from the centre to the superellipse boundary along unit direction (sx, sy)."""
    return (abs(sx / a) ** p + abs(sy / b) ** p) ** (-1.0 / p)


def _superellipse_normal(a: float, b: float, p: float, x: float, y: float) -> tuple[float, float]:
    nx = abs(x / a) ** (p - 1) / a * math.copysign(1.0, x)
    ny = abs(y / b) ** (p - 1) / b * math.copysign(1.0, y)
    norm = math.hypot(nx, ny) or 1.0
    return nx / norm, ny / norm


def _render_one(an: ChestAnatomy, zeta: float, cv: _Canvas, lung_tex, bone_tex) -> None:
    z_mm = zeta * an.chest_length_mm
    scale_x = 1.0 + an.taper * (0.5 - zeta)  # broader shoulders above, narrower below

    # ----- body layers (separable superellipses)
    cav_a = an.cavity_a_mm * scale_x
    cav_b = an.cavity_b_mm * (1.0 + 0.04 * math.sin(math.pi * zeta))
    cav_cy = an.center_dy_mm
    cav_top, cav_bot = cav_cy - cav_b, cav_cy + cav_b
    mus_a = cav_a + an.muscle_lat_mm
    mus_top, mus_bot = cav_top - an.muscle_front_mm, cav_bot + an.muscle_back_mm
    body_a = mus_a + an.fat_lat_mm
    body_top, body_bot = mus_top - an.fat_front_mm, mus_bot + an.fat_back_mm
    cv.paint(
        cv.superellipse(0.0, (body_top + body_bot) / 2, body_a, (body_bot - body_top) / 2, an.body_p),
        an.fat_hu,
    )
    cv.paint(
        cv.superellipse(0.0, (mus_top + mus_bot) / 2, mus_a, (mus_bot - mus_top) / 2, an.body_p),
        an.muscle_hu,
    )
    cavity_shape = cv.superellipse(0.0, cav_cy, cav_a, cav_b, an.cavity_p)
    cavity = cv.full_mask(cavity_shape)
    cv.paint(cavity_shape, an.mediastinal_fat_hu)

    # ----- lungs
    g = 0.5 + 0.5 * math.sin(0.5 * math.pi * min(max(zeta / 0.7, 0.0), 1.0))  # apex -> base
    lungs = []
    lung_mask = np.zeros_like(cavity)
    for side in (-1, 1):
        width = (cav_a - an.lung_sep_mm) * (an.lung_asym if side < 0 else 1.0) / (1 + an.lung_asym) * 2
        ax = 0.5 * width * (0.8 + 0.2 * g) + 8.0  # extends past the cavity wall, clipped below
        ay = cav_b * (0.55 + 0.45 * g) + 6.0
        cx = side * (an.lung_sep_mm + ax - 8.0)
        cy = cav_bot + 6.0 - ay  # posterior edge fixed
        lungs.append((side, cx, cy, ax, ay))
        shape = cv.superellipse(cx, cy, ax, ay, an.lung_p)
        if shape is not None:
            lung_mask[shape[0]] |= shape[1]
    lung_mask &= cavity
    rows = np.flatnonzero(lung_mask.any(axis=1))
    if rows.size:
        cols = np.flatnonzero(lung_mask.any(axis=0))
        sl = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        grad = np.clip((cv.c[sl[0]] - cav_cy) / cav_b, -1.0, 1.0)[:, None]
        val = an.lung_hu + an.lung_gradient_hu * grad + an.lung_texture_hu * lung_tex(zeta, sl)
        m = lung_mask[sl]
        cv.img[sl][m] = val[m]

    # ----- abdominal domes (liver right, spleen/stomach left)
    t_liver = (zeta - an.liver_z) / 0.22
    if t_liver > 0:
        s = _cap(t_liver)
        cv.paint(
            cv.ellipse(-0.35 * cav_a, cav_cy + 0.15 * cav_b, 0.62 * cav_a * s, 0.85 * cav_b * s, -0.2),
            an.liver_hu,
            cavity,
        )
    t_spleen = (zeta - an.liver_z - 0.06) / 0.2
    if t_spleen > 0:
        s = _cap(t_spleen)
        cv.paint(
            cv.ellipse(0.45 * cav_a, cav_cy + 0.3 * cav_b, 0.4 * cav_a * s, 0.6 * cav_b * s, 0.4),
            an.spleen_hu,
            cavity,
        )

    # ----- spine geometry (needed by mediastinal structures)
    vb_cy = cav_bot - 0.55 * an.vb_b_mm
    vb_top = vb_cy - an.vb_b_mm

    # ----- heart with pericardial fat
    t_heart = (zeta - an.heart_z0) / 0.28
    if t_heart > 0:
        s = _cap(t_heart) * (1.0 - 0.25 * _smoothstep((zeta - 0.85) / 0.15))
        hx, hy = an.heart_dx_mm * scale_x, cav_cy + an.heart_dy_mm
        pf = an.pericardial_fat_mm
        cv.paint(
            cv.ellipse(hx, hy, an.heart_a_mm * s + pf, an.heart_b_mm * s + pf, an.heart_angle),
            an.mediastinal_fat_hu,
            cavity,
        )
        cv.paint(
            cv.ellipse(hx, hy, an.heart_a_mm * s, an.heart_b_mm * s, an.heart_angle),
            an.blood_hu,
            cavity,
        )

    # ----- great vessels
    desc = (0.85 * an.vb_a_mm + 0.6 * an.aorta_r_mm, vb_cy - 0.5 * an.vb_b_mm - 0.4 * an.aorta_r_mm)
    asc = (-0.12 * cav_a, cav_cy - 0.3 * cav_b)
    cv.paint(cv.ellipse(desc[0], desc[1], an.aorta_r_mm, an.aorta_r_mm), an.blood_hu)
    f_asc = _smoothstep((zeta - an.arch_z) / 0.05) * (1.0 - _smoothstep((zeta - 0.62) / 0.08))
    if f_asc > 0:
        cv.paint(cv.ellipse(asc[0], asc[1], an.asc_aorta_r_mm * f_asc, an.asc_aorta_r_mm * f_asc), an.blood_hu)
    f_arch = max(0.0, 1.0 - abs(zeta - (an.arch_z - 0.03)) / 0.05)
    if f_arch > 0:
        cv.paint(cv.capsule(asc[0], asc[1], desc[0], desc[1], an.aorta_r_mm * math.sqrt(f_arch)), an.blood_hu)
    if zeta < an.arch_z:  # branches of the arch above it
        f_br = _smoothstep((an.arch_z - zeta) / 0.04)
        for k, bx in enumerate((-0.1, 0.05, 0.15)):
            cv.paint(
                cv.ellipse(bx * cav_a, cav_cy - (0.25 - 0.05 * k) * cav_b, 5.0 * f_br + 1.0, 5.0 * f_br + 1.0),
                an.blood_hu,
            )
    f_pa = max(0.0, 1.0 - abs(zeta - an.carina_z - 0.05) / 0.1)
    if f_pa > 0:
        px, py = 0.1 * cav_a, cav_cy - 0.42 * cav_b
        cv.paint(cv.ellipse(px, py, an.pulmonary_r_mm * f_pa, an.pulmonary_r_mm * f_pa), an.blood_hu, cavity)
        for side, cx, cy, ax, ay in lungs:
            hx = cx - side * 0.75 * ax
            cv.paint(cv.capsule(px, py, hx, cy - 0.1 * ay, 0.6 * an.pulmonary_r_mm * f_pa), an.blood_hu, cavity)

    # ----- esophagus, trachea, main bronchi
    eso = (-0.25 * an.vb_a_mm, vb_top - an.esophagus_r_mm - 1.0)
    cv.paint(cv.ellipse(eso[0], eso[1], an.esophagus_r_mm, 0.8 * an.esophagus_r_mm), an.muscle_hu)
    cv.paint(cv.ellipse(eso[0], eso[1], 1.5, 1.0), AIR_HU)
    tr = (0.0, eso[1] - 0.8 * an.esophagus_r_mm - an.trachea_r_mm - 1.0)
    wall = 1.8
    f_tr = 1.0 - _smoothstep((zeta - an.carina_z) / 0.03)
    if f_tr > 0:
        r = an.trachea_r_mm * (0.7 + 0.3 * f_tr)
        cv.paint(cv.ellipse(tr[0], tr[1], r, r * 0.9), an.muscle_hu)
        cv.paint(cv.ellipse(tr[0], tr[1], r - wall, r * 0.9 - wall), AIR_HU)
    f_br = _smoothstep((zeta - an.carina_z + 0.02) / 0.03) * (1.0 - _smoothstep((zeta - an.carina_z - 0.1) / 0.05))
    if f_br > 0:
        spread = (zeta - an.carina_z + 0.02) * 300.0
        for side in (-1, 1):
            bx = tr[0] + side * min(spread, an.lung_sep_mm + 6.0)
            r = 0.7 * an.trachea_r_mm * f_br
            cv.paint(cv.ellipse(bx, tr[1] + 4.0, r, r), an.muscle_hu)
            cv.paint(cv.ellipse(bx, tr[1] + 4.0, max(r - 1.5, 0.0), max(r - 1.5, 0.0)), AIR_HU)

    # ----- lung contents: vessels, airways, nodules (only where it is still lung)
    lung_mask &= cv.img < -500.0
    for tube in an.vessels + an.airways:
        dz = (zeta - tube.z_center) / tube.z_half
        if abs(dz) >= 1.0:
            continue
        taper = math.sqrt(1.0 - dz * dz) ** 0.5
        side, cx, cy, ax, ay = lungs[0] if tube.side < 0 else lungs[1]
        dzeta = zeta - 0.5
        u, v = tube.u + tube.du * dzeta, tube.v + tube.dv * dzeta
        x = cx - side * u * ax
        y = cy + v * ay
        r = tube.radius_mm * taper
        ang = tube.angle if side > 0 else math.pi - tube.angle
        if tube.wall_mm > 0:
            cv.paint(cv.ellipse(x, y, r * tube.elong, r, ang), an.muscle_hu, lung_mask)
            ri = r - tube.wall_mm
            if ri > 0.3:
                cv.paint(cv.ellipse(x, y, ri * tube.elong, ri, ang), AIR_HU, lung_mask)
        else:
            cv.paint(cv.ellipse(x, y, r * tube.elong, r, ang), an.blood_hu, lung_mask)

    # ----- spine
    phase = (z_mm / an.vertebra_height_mm + an.vertebra_phase) % 1.0
    disc = _smoothstep(1.0 - abs(phase - 0.5) / 0.12) if abs(phase - 0.5) < 0.12 else 0.0
    cort = (1 - disc) * an.cortical_hu + disc * an.disc_hu
    canc = (1 - disc) * an.cancellous_hu + disc * an.disc_hu
    vb = cv.ellipse(0.0, vb_cy, an.vb_a_mm, an.vb_b_mm)
    cv.paint(vb, cort)
    inner = cv.ellipse(0.0, vb_cy, an.vb_a_mm - an.cortical_mm, an.vb_b_mm - an.cortical_mm)
    if inner is not None:
        sl, m = inner
        cv.img[sl][m] = (canc + 40.0 * (1 - disc) * bone_tex(zeta, sl))[m]
    canal_cy = vb_cy + an.vb_b_mm + an.canal_r_mm + 0.5
    lamina = 3.5
    post_hu = 0.75 * an.cortical_hu
    cv.paint(
        cv.ellipse(0.0, canal_cy + 0.5 * an.canal_r_mm + lamina + 9.0, 14.0, 3.5, math.pi / 2),
        post_hu,
    )  # spinous process
    for side in (-1, 1):
        cv.paint(
            cv.ellipse(side * (an.canal_r_mm + 10.0), canal_cy - 1.0, 13.0, 4.0, side * 0.35),
            post_hu,
        )  # transverse processes
    cv.paint(cv.ellipse(0.0, canal_cy, an.canal_r_mm + lamina, an.canal_r_mm + lamina), post_hu)
    cv.paint(cv.ellipse(0.0, canal_cy, an.canal_r_mm, an.canal_r_mm), 25.0)

    # ----- ribs, costal cartilage, sternum, scapulae
    p = an.cavity_p
    for rib in an.ribs:
        th = rib.theta + rib.drift * (zeta - 0.5)
        sx, sy = rib.side * math.sin(th), math.cos(th)
        rr = _superellipse_radius(cav_a, cav_b, p, sx, sy)
        bx, by = rr * sx, rr * sy
        nx, ny = _superellipse_normal(cav_a, cav_b, p, bx, by)
        cx, cy = bx + nx * (rib.b_mm + 0.8), cav_cy + by + ny * (rib.b_mm + 0.8)
        ang = math.atan2(ny, nx) + math.pi / 2  # long axis along the contour
        if th > an.cartilage_theta:
            cv.paint(cv.ellipse(cx, cy, rib.a_mm, rib.b_mm, ang), an.cartilage_hu)
        else:
            cv.paint(cv.ellipse(cx, cy, rib.a_mm, rib.b_mm, ang), an.rib_cortical_hu)
            c = rib.cortical_mm
            cv.paint(cv.ellipse(cx, cy, rib.a_mm - c, rib.b_mm - c, ang), an.rib_marrow_hu)
    f_st = 1.0 - 0.6 * _smoothstep((zeta - 0.85) / 0.15)
    sy_ = cav_top - an.sternum_b_mm * f_st
    cv.paint(cv.ellipse(0.0, sy_, an.sternum_a_mm * f_st, an.sternum_b_mm * f_st), an.rib_cortical_hu)
    cv.paint(
        cv.ellipse(0.0, sy_, an.sternum_a_mm * f_st - 1.5, an.sternum_b_mm * f_st - 1.5),
        an.rib_marrow_hu,
    )
    f_sc = _smoothstep((an.scapula_z - zeta) / 0.08)
    if f_sc > 0:
        for side in (-1, 1):
            th = 0.75
            sx, sy = side * math.sin(th), math.cos(th)
            rr = _superellipse_radius(cav_a, cav_b, p, sx, sy)
            bx, by = rr * sx, rr * sy
            nx, ny = _superellipse_normal(cav_a, cav_b, p, bx, by)
            d = 0.6 * an.muscle_back_mm
            ang = math.atan2(ny, nx) + math.pi / 2
            cv.paint(
                cv.ellipse(bx + nx * d, cav_cy + by + ny * d, an.scapula_len_mm * f_sc, 3.5, ang),
                0.8 * an.rib_cortical_hu,
            )

    # ----- lesions
    for les in an.lesions:
        dz = (z_mm - les.z_center * an.chest_length_mm) / les.z_half_mm
        if abs(dz) >= 1.0:
            continue
        r = les.radius_mm * math.sqrt(1.0 - dz * dz)
        if les.kind == "lung":
            side, cx, cy, ax, ay = lungs[0] if les.side < 0 else lungs[1]
            cv.paint(cv.ellipse(cx - side * les.u * ax, cy + les.v * ay, r, r), les.hu, lung_mask)
            continue
        if les.kind == "liver":
            if t_liver <= 0:
                continue
            s = _cap(t_liver)
            x = -0.35 * cav_a + les.u * 0.62 * cav_a * s
            y = cav_cy + 0.15 * cav_b + les.v * 0.85 * cav_b * s
        elif les.kind == "heart":
            if t_heart <= 0:
                continue
            s = _cap(t_heart)
            ca, sa = math.cos(an.heart_angle), math.sin(an.heart_angle)
            lu, lv = les.u * an.heart_a_mm * s, les.v * an.heart_b_mm * s
            x = an.heart_dx_mm * scale_x + lu * ca - lv * sa
            y = cav_cy + an.heart_dy_mm + lu * sa + lv * ca
        else:  # chest wall
            sx, sy = les.side * math.sin(les.u), math.cos(les.u)
            rr = _superellipse_radius(cav_a, cav_b, p, sx, sy)
            bx, by = rr * sx, rr * sy
            nx, ny = _superellipse_normal(cav_a, cav_b, p, bx, by)
            depth = les.v * (an.muscle_front_mm if sy < 0 else an.muscle_lat_mm)
            x, y = bx + nx * depth, cav_cy + by + ny * depth
        shape = cv.ellipse(x, y, r, r)
        if shape is None:
            continue
        sl, m = shape
        sub = cv.img[sl]
        m = m & (sub > -60.0) & (sub < 150.0)  # soft tissue only
        sub[m] += les.hu


def render_slices(
    anatomy: ChestAnatomy, n_slices: int, size: int, fov_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Render ``n_slices`` equally spaced axial slices (see :func:`slice_positions`) in HU.

    Returns float32 ``(n_slices, size, size)``; ``rng`` drives the lung and bone textures, so
    the result is reproducible given ``anatomy`` and the state of ``rng``.
    """
    if n_slices < 1 or size < 1:
        raise ValueError("n_slices and size must be positive")
    n_fine = size * SUPERSAMPLE
    omega = anatomy.chest_length_mm / 12.0  # texture decorrelates over ~1 cm along z
    n_coarse = max(8, int(round(fov_mm / 4.0)))
    lung_tex = _Texture(rng, n_fine, n_coarse, sigma=0.8, omega=omega)
    bone_tex = _Texture(rng, n_fine, max(8, int(round(fov_mm / 2.5))), sigma=0.7, omega=omega)
    out = np.empty((n_slices, size, size), dtype=np.float32)
    for i, zeta in enumerate(slice_positions(anatomy, n_slices)):
        cv = _Canvas(size, fov_mm)
        _render_one(anatomy, float(zeta), cv, lung_tex, bone_tex)
        out[i] = cv.downsample()
    return out
