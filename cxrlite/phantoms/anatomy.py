"""Normal frontal chest anatomy for phantom radiographs (geometry and density layers).

Coordinates. Shapes are defined in *canonical* coordinates x, y in [0, 1] (x to the image right,
y down). The patient faces the viewer, so image left = patient RIGHT (radiological convention);
`side_sign("right") == -1`, `side_sign("left") == +1`. Inside a hemithorax, lung coordinates are
s = |x - cx| / hw (0 = midline, 1 = inner rib margin at the costophrenic angle) and
v = (y - apex_y) / H (0 = lung apex, 1 = costophrenic angle).

Patient positioning (small rotation, shift, zoom) maps canonical coordinates to pixels. Analytic
shapes are evaluated on the inverse-mapped pixel grid and PIL strokes have their points mapped
forward, so nothing is resampled and no empty corners appear after a rotation.

Densities are attenuation in arbitrary units (soft tissue through the chest ~1); the display is
monotone in attenuation, so bright = dense as on a radiograph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cxrlite.data.labels import StudyLabels

F32 = np.float32


def side_sign(side: str) -> int:
    """-1 for the patient's right (image left), +1 for the patient's left (image right)."""
    return -1 if side == "right" else 1


def soft(margin: np.ndarray, eps: float) -> np.ndarray:
    """Anti-aliased inside-mask from a signed margin (positive inside), ramp width eps."""
    return np.clip(margin * (1.0 / eps) + 0.5, 0.0, 1.0)


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=F32) + 0.5) / size
    return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


@dataclass
class Frame:
    """Canonical -> pixel mapping for one image (patient rotation, shift and zoom)."""

    size: int
    angle: float  # radians, positive turns the patient clockwise on screen
    shift: tuple[float, float]
    zoom: float
    X: np.ndarray = field(init=False, repr=False)  # canonical x of every pixel centre
    Y: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        px, py = _pixel_centres(self.size)
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx = (px - 0.5 - self.shift[0]) / self.zoom
        dy = (py - 0.5 - self.shift[1]) / self.zoom
        # inverse rotation of the pixel grid gives each pixel's canonical coordinate
        self.X = (0.5 + c * dx + s * dy).astype(F32)
        self.Y = (0.5 - s * dx + c * dy).astype(F32)

    def to_px(self, pts: np.ndarray) -> list[tuple[float, float]]:
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = pts[:, 0] - 0.5, pts[:, 1] - 0.5
        x = (0.5 + self.shift[0] + self.zoom * (c * dx - s * dy)) * self.size
        y = (0.5 + self.shift[1] + self.zoom * (s * dx + c * dy)) * self.size
        return list(zip(x.tolist(), y.tolist(), strict=True))

    def box(self, x: float, y: float, rx: float, ry: float) -> list[float]:
        """PIL bounding box of an ellipse centred at canonical (x, y) with radii rx, ry.

        Only the centre is rotated: at a few degrees a round shape's box barely changes, and
        mapping the corners could swap them, which PIL refuses.
        """
        ((px, py),) = self.to_px(np.array([[x, y]]))
        hx, hy = self.px(rx), self.px(ry)
        return [px - hx, py - hy, px + hx, py + hy]

    def px(self, length: float) -> float:
        """A canonical length in pixels."""
        return length * self.size * self.zoom

    def width(self, length: float) -> int:
        return max(1, round(self.px(length)))

    def canvas(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        im = Image.new("L", (self.size, self.size), 0)
        return im, ImageDraw.Draw(im)

    def layer(self, im: Image.Image, blur_px: float = 0.0) -> np.ndarray:
        """An 8-bit PIL stroke layer as float 0..1, optionally blurred (PIL blurs only 8-bit)."""
        if blur_px > 0.25:
            im = im.filter(ImageFilter.GaussianBlur(blur_px))
        return np.asarray(im, dtype=F32) * (1.0 / 255.0)


@dataclass
class Anatomy:
    """The random geometry of one patient's chest (canonical units)."""

    cx: float
    hw: float  # half inner thoracic width at the costophrenic angles
    apex_y: float
    cp_y: float  # costophrenic angle level
    dome_rise: tuple[float, float]  # (right, left) height of each dome above cp_y
    med_w: float  # upper mediastinum half-width, in s units
    knob: float  # aortic knob bulge, s units (larger when unfolded in the elderly)
    knob_calcified: bool
    ctr: float
    heart_tilt: float
    heart_roundness: float
    fat: float  # soft tissue thickness, 0 thin .. 1 obese
    breast: float  # 0 none; F: size of breast shadows
    bone_density: float
    rib_spacing: float
    rib_curve: float
    clavicle_med_y: float
    clavicle_lat_y: float
    scapula_s: float  # medial border of the scapula, s units (AP: over the lung)
    gastric_bubble: bool
    cartilage_calcified: bool

    @property
    def H(self) -> float:
        return self.cp_y - self.apex_y

    def dome_top(self, sign: int) -> float:
        return self.cp_y - self.dome_rise[0 if sign < 0 else 1]

    def y_at(self, v: float) -> float:
        return self.apex_y + v * self.H

    def x_at(self, sign: int, s: float) -> float:
        return self.cx + sign * s * self.hw

    def point(self, sign: int, s: float, v: float) -> tuple[float, float]:
        return self.x_at(sign, s), self.y_at(v)

    # ---- heart: a tilted ellipse whose horizontal extent is exactly ctr x thoracic width
    def heart_geometry(self) -> tuple[float, float, float, float, float]:
        width = 2.0 * self.ctr * self.hw
        right_x = self.cx - 0.38 * width  # a third of the heart lies right of the midline
        half = width / 2.0
        hx = right_x + half
        th = self.heart_tilt
        b = self.heart_roundness * half
        a = math.sqrt(max(half**2 - (b * math.sin(th)) ** 2, 1e-6) / math.cos(th) ** 2)
        v_ext = math.sqrt((a * math.sin(th)) ** 2 + (b * math.cos(th)) ** 2)
        hy = self.dome_top(+1) + 0.05 - v_ext  # the heart sits on the left dome
        return hx, hy, a, b, v_ext

    def heart_extent(self) -> tuple[float, float, float, float]:
        """(right border x, left border x, top y, bottom y) of the cardiac silhouette."""
        hx, hy, _, _, v_ext = self.heart_geometry()
        width = 2.0 * self.ctr * self.hw
        return hx - width / 2, hx + width / 2, hy - v_ext, hy + v_ext

    def heart_margin(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        hx, hy, a, b, _ = self.heart_geometry()
        c, s = math.cos(self.heart_tilt), math.sin(self.heart_tilt)
        dx, dy = X - hx, Y - hy
        p_long = (dx * c + dy * s) / a
        p_short = (-dx * s + dy * c) / b
        return (1.0 - np.sqrt(p_long * p_long + p_short * p_short)) * b

    # ---- lungs
    def lung_coords(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, ...]:
        u = (X - self.cx) * (1.0 / self.hw)
        return u, np.abs(u), (Y - self.apex_y) * (1.0 / self.H)

    def cavity_margin(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, ...]:
        """Signed margin of the hemithoraces above the domes (mediastinum, heart not removed)."""
        u, s, v = self.lung_coords(X, Y)
        vc = np.clip(v, 0.0, 1.0)
        lateral = (1.0 - 0.36 * (1.0 - vc) ** 2 - s) * self.hw
        top = (v - 1.1 * (s - 0.42) ** 2) * self.H
        return np.minimum(np.minimum(lateral, top), self.dome_margin(X, Y)), u, s, v

    def dome_margin(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Height above the hemidiaphragms (> 0 above). Domes peak at s = 0.5."""
        u = (X - self.cx) * (1.0 / self.hw)
        rise = np.where(u < 0, F32(self.dome_rise[0]), F32(self.dome_rise[1]))
        d = np.abs(u) - 0.5
        curve = np.where(d > 0, F32(4.0), F32(5.2)) * rise  # 1 / 0.5**2, steeper medially
        return self.cp_y - rise + curve * d * d - Y

    def wall_margin(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Distance inside the lateral chest wall and the apical pleura (pneumothorax gap)."""
        _, s, v = self.lung_coords(X, Y)
        lateral = (1.0 - 0.36 * (1.0 - np.clip(v, 0.0, 1.0)) ** 2 - s) * self.hw
        return np.minimum(lateral, (v - 1.1 * (s - 0.42) ** 2) * self.H)

    def lung_margin(self, X: np.ndarray, Y: np.ndarray, cavity=None) -> np.ndarray:
        """Signed margin (canonical units, > 0 inside) of both aerated lung fields.

        cavity: this grid's `cavity_margin` result, when the caller already has it.
        """
        cav, u, s, v = cavity if cavity is not None else self.cavity_margin(X, Y)
        knob = self.knob * np.exp(-(((v - 0.27) / 0.07) ** 2)) + 0.04 * np.exp(
            -(((v - 0.42) / 0.05) ** 2)
        )
        med_s = self.med_w + np.where(u > 0, knob, 0.02 * np.clip(v - 0.2, 0.0, 1.0))
        medial = (s - med_s) * self.hw
        return np.minimum(np.minimum(cav, medial), -self.heart_margin(X, Y))

    def hilum(self, sign: int) -> tuple[float, float]:
        # the left hilum sits higher than the right
        return self.point(sign, self.med_w + 0.16, 0.46 if sign < 0 else 0.41)


def sample_anatomy(labels: StudyLabels, rng: np.random.Generator) -> Anatomy:
    """One patient's chest geometry; view, sex, age, ctr and atelectasis shape it.

    Draws the same number of random values whatever the labels, so a study with and without a
    finding share their anatomy.
    """
    male = labels.sex == "M"
    ap = labels.view == "AP"
    old = max(labels.age - 45, 0) / 40.0  # 0 at 45, 1 at 85
    hw = rng.uniform(0.345, 0.385) if male else rng.uniform(0.315, 0.355)
    apex_y = rng.uniform(0.11, 0.15)
    # supine AP films are taken in poorer inspiration; the elderly are often hyperinflated
    cp_y = rng.uniform(0.78, 0.83) - (0.04 if ap else 0.0) + 0.02 * min(old, 1.0)
    rise_r = rng.uniform(0.11, 0.14) * (1.0 - 0.25 * min(old, 1.0))
    rise = [rise_r, rise_r - rng.uniform(0.005, 0.025)]
    if labels.atelectasis is not None:  # volume loss elevates the hemidiaphragm
        for i, side in enumerate(("right", "left")):
            if labels.atelectasis.side in (side, "bilateral"):
                rise[i] += 0.035
    return Anatomy(
        cx=0.5 + rng.uniform(-0.01, 0.01),
        hw=hw,
        apex_y=apex_y,
        cp_y=cp_y,
        dome_rise=(rise[0], rise[1]),
        med_w=rng.uniform(0.15, 0.19) * (1.12 if ap else 1.0),
        knob=rng.uniform(0.07, 0.11) + 0.09 * min(old, 1.2) * rng.uniform(0.5, 1.0),
        knob_calcified=bool(rng.random() < 0.5) and labels.age > 65,
        ctr=labels.ctr,
        heart_tilt=math.radians(rng.uniform(20, 32)),
        heart_roundness=rng.uniform(0.72, 0.82),
        fat=float(rng.beta(2, 3)),
        breast=rng.uniform(0.6, 1.2) if labels.sex == "F" else 0.0,
        bone_density=float(np.clip(1.0 - 0.35 * old * (1.3 if not male else 1.0), 0.5, 1.0)),
        rib_spacing=rng.uniform(0.070, 0.08),
        rib_curve=rng.uniform(0.22, 0.3),
        clavicle_med_y=apex_y + (rng.uniform(0.0, 0.03) if ap else rng.uniform(0.08, 0.11)),
        clavicle_lat_y=apex_y + (rng.uniform(-0.02, 0.01) if ap else rng.uniform(-0.05, -0.02)),
        scapula_s=rng.uniform(0.62, 0.75) if ap else rng.uniform(1.0, 1.12),
        gastric_bubble=bool(rng.random() < 0.7),
        cartilage_calcified=bool(rng.random() < 0.6) and labels.age > 60,
    )


def body_tissue(anat: Anatomy, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Soft-tissue attenuation of neck, shoulders, chest wall, mediastinum and abdomen."""
    chest_w = anat.hw * (1.2 + 0.12 * anat.fat)
    shoulder = 0.62 * smoothstep(0.0, 0.13, Y)
    width = 0.09 + np.where(
        Y < 0.13, shoulder, chest_w - 0.09 + (0.53 - chest_w) * (1 - smoothstep(0.13, 0.36, Y))
    )
    t = 1.0 - ((X - anat.cx) / width) ** 2
    thick = np.sqrt(np.clip(t, 0.0, 1.0))
    edge = soft(t, 0.04)
    return (0.9 + 0.15 * anat.fat) * thick * edge


def lung_air(anat: Anatomy, X: np.ndarray, Y: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """How much air each pixel's ray crosses: deep in the bases, thin at the chest wall."""
    _, s, v = anat.lung_coords(X, Y)
    lateral = 1.0 - 0.36 * (1.0 - np.clip(v, 0.0, 1.0)) ** 2 - s
    depth = np.sqrt(np.clip(lateral * 4.0, 0.0, 1.0)) * (0.8 + 0.2 * np.clip(v, 0.0, 1.0))
    return 0.62 * lung * depth


def draw_ribs(anat: Anatomy, frame: Frame) -> np.ndarray:
    """Posterior ribs (curved, convex upward) and fainter anterior ribs sloping down-medially."""
    post, dpost = frame.canvas()
    ant, dant = frame.canvas()
    w_post, w_ant = frame.width(0.021), frame.width(0.025)
    cortex = max(1, round(frame.px(0.005)))
    for sign in (-1, 1):
        for k in range(11):
            y0 = anat.apex_y - 0.035 + k * anat.rib_spacing
            curve = anat.rib_curve * (1.0 + 2.2 * math.exp(-k / 1.3))
            v = (y0 - anat.apex_y) / anat.H
            s_end = 1.0 - 0.36 * (1.0 - min(max(v + 0.1, 0.0), 1.0)) ** 2 + 0.07
            s = np.linspace(0.08, s_end, 14)
            y = y0 + curve * ((s - 0.36) ** 2 - (0.08 - 0.36) ** 2)
            pts = np.stack([anat.cx + sign * s * anat.hw, y], 1)
            px = frame.to_px(pts)
            dpost.line(px, fill=255, width=w_post)
            dpost.line(px, fill=150, width=max(1, w_post - 2 * cortex))
            # anterior rib: from the lateral end down and medially to the costal cartilage
            sa = np.linspace(s_end, 0.3 + 0.02 * k, 10)
            ya = y[-1] + (s_end - sa) * anat.hw * 0.62 + 0.04 * (s_end - sa) ** 2
            pts_a = np.stack([anat.cx + sign * sa * anat.hw, ya], 1)
            dant.line(frame.to_px(pts_a), fill=255, width=w_ant)
            if anat.cartilage_calcified and 2 <= k <= 8:
                x, yy = pts_a[-1]
                r = 0.012
                dant.ellipse(frame.box(x, yy, r, r), fill=230)
    blur = frame.px(0.002)
    return frame.layer(post, blur) + 0.4 * frame.layer(ant, blur * 2.5)


def draw_clavicles_scapulae(anat: Anatomy, frame: Frame) -> np.ndarray:
    bones, d = frame.canvas()
    for sign in (-1, 1):
        t = np.linspace(0.0, 1.0, 16)
        s = 0.1 + 1.05 * t
        y = anat.clavicle_med_y + (anat.clavicle_lat_y - anat.clavicle_med_y) * t
        y = y + 0.012 * np.sin(2 * math.pi * t)  # the clavicle's gentle S curve
        pts = np.stack([anat.cx + sign * s * anat.hw, y], 1)
        d.line(frame.to_px(pts), fill=255, width=frame.width(0.034), joint="curve")
        # scapula: a faint triangle whose medial border lies over the lung on AP films
        ms = anat.scapula_s
        tri = [
            (1.35, anat.apex_y - 0.02),
            (ms + 0.12, anat.apex_y - 0.02),
            (ms, anat.apex_y + 0.06),
            (ms + 0.1, anat.apex_y + 0.38),
            (1.25, anat.apex_y + 0.22),
        ]
        pts = np.array([(anat.cx + sign * a * anat.hw, b) for a, b in tri])
        d.polygon(frame.to_px(pts), fill=70)
        # humeral head in the upper corner
        hx, hy, r = anat.cx + sign * 1.38 * anat.hw, anat.apex_y - 0.01, 0.075
        d.ellipse(frame.box(hx, hy, r, r), fill=200)
    return frame.layer(bones, frame.px(0.003))


def spine(anat: Anatomy, frame: Frame, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Vertebral column: bodies with disc spaces and pedicle rings, seen through the heart."""
    half = 0.042
    dx = X - anat.cx
    column = soft(half - np.abs(dx), 0.006)
    period = anat.rib_spacing * 0.95
    phase = (Y - anat.apex_y) / period
    frac = phase - np.floor(phase)
    discs = 1.0 - 0.5 * np.exp(-(((frac - 0.5) / 0.09) ** 2))
    cortex = 1.0 + 0.2 * np.exp(-(((np.abs(dx) - half) / 0.006) ** 2))
    ped, d = frame.canvas()
    ring = frame.width(0.005)
    for k in range(-3, 16):
        yc = anat.apex_y + (k + 0.2) * period
        for sign in (-1, 1):  # pedicles
            d.ellipse(frame.box(anat.cx + sign * 0.026, yc, 0.011, 0.016), outline=255, width=ring)
        d.ellipse(frame.box(anat.cx, yc + 0.017, 0.006, 0.013), fill=160)  # spinous process
    return column * discs * cortex + 0.5 * frame.layer(ped, frame.px(0.002))


def airways(anat: Anatomy, frame: Frame) -> np.ndarray:
    """Trachea and main bronchi as an air layer (the right main bronchus is steeper)."""
    im, d = frame.canvas()
    carina = (anat.cx + 0.004, anat.y_at(0.36))
    trachea = np.array([[anat.cx, -0.05], [anat.cx - 0.006, anat.y_at(0.2)], carina])
    d.line(frame.to_px(trachea), fill=255, width=frame.width(0.045), joint="curve")
    w = frame.width(0.022)
    d.line(frame.to_px(np.array([carina, anat.hilum(-1)])), fill=110, width=w)
    d.line(frame.to_px(np.array([carina, anat.hilum(+1)])), fill=110, width=w)
    return frame.layer(im, frame.px(0.004))


def draw_vessels(
    anat: Anatomy, frame: Frame, rng: np.random.Generator, upper_boost: float = 1.0,
    blur: float = 0.005,
) -> np.ndarray:  # fmt: skip
    """Branching pulmonary vessels from each hilum, tapering, absent in the outer third.

    upper_boost > 1 makes the upper-zone vessels larger (cephalization in venous hypertension);
    a larger blur makes them indistinct (interstitial edema).
    """
    im, d = frame.canvas()
    unit = frame.px(0.004)
    segments: list[tuple[tuple[float, float], tuple[float, float], float, int]] = []
    for sign in (-1, 1):
        hx, hy = anat.hilum(sign)
        for angle in np.linspace(-65, 75, 9) + rng.uniform(-8, 8, 9):
            a = math.radians(angle)
            length = anat.hw * rng.uniform(0.45, 0.62) * (0.8 if angle < -30 else 1.0)
            base = (1.25 if angle > 20 else 1.0) * (upper_boost if angle < -15 else 1.0)
            _branch(segments, (hx, hy), sign, a, length, unit * 2.2 * base, 2, rng)
        # hilar pulmonary arteries
        r = 0.03
        d.ellipse(frame.box(hx, hy, r, 1.6 * r), fill=170)
    # one coordinate transform for all segments: per-segment calls dominated the run time
    ends = frame.to_px(np.array([p for seg in segments for p in seg[:2]]))
    for k, (_, _, width, fill) in enumerate(segments):
        d.line(ends[2 * k : 2 * k + 2], fill=fill, width=max(1, round(width)))
    return frame.layer(im, frame.px(blur))


def _branch(segments, start, sign, angle, length, width, depth, rng) -> None:
    x0, y0 = start
    n = 3
    pts = [start]
    for i in range(1, n + 1):
        bend = angle + rng.uniform(-0.15, 0.15) * i
        x0 += sign * math.cos(bend) * length / n
        y0 += math.sin(bend) * length / n
        pts.append((x0, y0))
    for i in range(n):
        segments.append((pts[i], pts[i + 1], width * (1.0 - 0.3 * i), int(230 - 30 * i)))
    if depth > 1:
        for j in (1, 2):
            for turn in (-0.45, 0.45):
                _branch(
                    segments, pts[j], sign, angle + turn + rng.uniform(-0.2, 0.2),
                    length * 0.45, width * 0.55, depth - 1, rng,
                )  # fmt: skip


def breasts(anat: Anatomy, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Breast shadows: density over the lower zones ending at a sharp, convex-down lower edge."""
    if anat.breast <= 0:
        return np.zeros_like(X)
    _, s, _ = anat.lung_coords(X, Y)
    lower = anat.cp_y - 0.04 + 0.04 * anat.breast - 0.45 * (s - 0.6) ** 2
    edge = soft(lower - Y, 0.012)
    fade = smoothstep(lower - 0.2 * anat.breast - 0.06, lower, Y)
    across = soft(1.25 - s, 0.15) * soft(s - 0.1, 0.2)
    return 0.13 * anat.breast * edge * fade * across


def aortic_knob_calcification(anat: Anatomy, frame: Frame) -> np.ndarray:
    """A thin curved rim of calcium in the aortic knob (the elderly)."""
    if not anat.knob_calcified:
        return np.zeros((frame.size, frame.size), F32)
    im, d = frame.canvas()
    x = anat.x_at(+1, anat.med_w + anat.knob - 0.06)
    d.arc(frame.box(x, anat.y_at(0.27), 0.03, 0.03), 200, 330, fill=255, width=frame.width(0.006))
    return frame.layer(im, frame.px(0.002))


def gastric_bubble(anat: Anatomy, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Air in the stomach fundus under the left hemidiaphragm (fixes situs for the reader)."""
    if not anat.gastric_bubble:
        return np.zeros_like(X)
    x0, y0 = anat.x_at(+1, 0.5), anat.dome_top(+1) + 0.05
    r2 = ((X - x0) / 0.06) ** 2 + ((Y - y0) / 0.032) ** 2
    flat_top = soft(Y - (y0 - 0.012), 0.004)  # air-fluid level
    return 0.3 * soft(1.0 - r2, 0.3) * flat_top


def spline(points, n: int = 40) -> np.ndarray:
    """A Catmull-Rom curve through the points, for catheters and leads that bend smoothly."""
    p = np.asarray(points, dtype=np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0.0, 1.0, max(2, n // (len(p) - 3)), endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(
            0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                   + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
        )  # fmt: skip
    out.append(p[-2][None, :])
    return np.vstack(out)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise (about `cells` blobs across), zero mean and unit-ish spread."""
    small = rng.standard_normal((cells, cells)).astype(F32)
    im = Image.fromarray(small, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=F32)
