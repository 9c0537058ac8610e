"""Findings and support devices drawn onto a phantom's density layers.

Where each finding goes (image left = patient RIGHT; s, v, canonical units as in
`phantom_anatomy`; "lung height" H is apex to costophrenic angle, about 0.65 of the image):
- effusion: fluid filling the hemithorax from the costophrenic angle up, obliterating the angle
  and the dome; its top is a meniscus rising toward the lateral wall, reaching 0.30 / 0.50 /
  0.75 of the lung height at the wall for small / moderate / large (medially half that).
  Bilateral: both sides, same size.
- pneumothorax: a black band without vessel markings along the apex and lateral chest wall,
  bounded by a thin white visceral pleural line; 0.07 (small) or 0.17 (large) of the image
  wide at the apex, narrowing by 45% toward the base; a large one leaves a denser collapsed
  lung.
- consolidation (loss of aeration, optional air bronchograms), by lobe: upper lobes fill the
  upper zone down to v = 0.42 on the right (sharp lower edge: the horizontal fissure) or a soft
  edge near v = 0.47 on the left; middle lobe / lingula a blob against the right / left heart
  border at v ~ 0.6 (silhouetting it); lower lobes a blob at s ~ 0.6, v ~ 0.82 over the
  hemidiaphragm (silhouetting it), on the left also behind the heart.
- nodule / mass: a round (mass: lobulated) opacity of size_mm (the inner chest width counts as
  280 mm) at v ~ 0.22 / 0.5 / 0.75 for the upper / mid / lower zone, s 0.45-0.72 (a lower left
  one is kept lateral to the heart border).
- edema: bilateral perihilar (bat-wing) haze widening and densening with severity, a fine
  reticular opacity through both lungs (basal > apical), Kerley B lines at both lateral bases,
  and larger, blurred upper-zone vessels (cephalization; see `draw_vessels`).
- atelectasis: a thick plate-like band across the lower zone (s 0.3-0.92) about 0.05 above the
  hemidiaphragm of each affected side, which is itself elevated (see `sample_anatomy`).
- devices (radiopaque, white): endotracheal tube in the trachea from above the image to 3-6 cm
  above the carina; central venous catheter from the right neck (70%) or the
  left subclavian vein down the SVC to about v = 0.5; pacemaker generator below the left
  clavicle (image right) with one lead to the right atrium and one to the right ventricular
  apex.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cxrlite.data.labels import (
    Atelectasis,
    Consolidation,
    Edema,
    Effusion,
    Nodule,
    Pneumothorax,
    lobe_side,
)
from cxrlite.phantoms.anatomy import Anatomy, Frame, side_sign, smooth_noise, soft, spline

EFFUSION_HEIGHT = {"small": 0.3, "moderate": 0.5, "large": 0.75}  # of the lung height
PNEUMOTHORAX_GAP = {"small": 0.07, "large": 0.17}  # apical gap, canonical units
EDEMA_STRENGTH = {"mild": 0.55, "moderate": 0.75, "severe": 0.95}
THORAX_MM = 280.0  # inner thoracic width a nodule's size_mm is scaled against


@dataclass
class Layers:
    """What the findings change. keep: fraction of lung air kept (1 = fully aerated)."""

    anat: Anatomy
    frame: Frame
    X: np.ndarray
    Y: np.ndarray
    u: np.ndarray
    s: np.ndarray
    v: np.ndarray
    lung: np.ndarray  # soft mask of the aerated lung fields
    cavity: np.ndarray  # hemithoraces above the domes, including behind the heart
    keep: np.ndarray
    extra_air: np.ndarray  # pleural air (pneumothorax)
    vessel_keep: np.ndarray
    dense: np.ndarray  # added attenuation (nodules, pleural line, devices)

    def side(self, sign: int) -> np.ndarray:
        return soft(sign * self.u, 0.04)

    def opacify(self, mask: np.ndarray, strength: float = 1.0) -> None:
        """Replace air by fluid/tissue where mask is 1 (independent opacities combine)."""
        self.keep *= 1.0 - np.clip(strength * mask, 0.0, 1.0)


def draw_effusion(layers: Layers, eff: Effusion) -> None:
    a = layers.anat
    sides = (-1, 1) if eff.side == "bilateral" else (side_sign(eff.side),)
    h = EFFUSION_HEIGHT[eff.size] * a.H
    t = np.clip((layers.s - 0.15) / 0.85, 0.0, 1.0)
    top = a.cp_y - h * (0.5 + 0.5 * t * t)  # meniscus: higher along the lateral wall
    layering = 0.85 + 0.15 * np.clip((layers.Y - top) / 0.1, 0.0, 1.0)
    fluid = soft(layers.Y - top, 0.015) * layering * soft((1.03 - layers.s) * a.hw, 0.01)
    fluid *= soft(layers.s - a.med_w * 0.8, 0.05)
    for sign in sides:
        m = fluid * layers.side(sign)
        layers.opacify(m * layers.cavity, 0.97)
        layers.dense += 0.08 * m * soft(a.cp_y + 0.02 - layers.Y, 0.02)


def draw_pneumothorax(layers: Layers, ptx: Pneumothorax) -> None:
    a = layers.anat
    sign = side_sign(ptx.side)
    gap = PNEUMOTHORAX_GAP[ptx.size] * (1.0 - 0.45 * np.clip(layers.v, 0.0, 1.0))
    wall = a.wall_margin(layers.X, layers.Y)
    lung_side = layers.lung * layers.side(sign)
    space = soft(gap - wall, 0.004) * lung_side
    layers.extra_air += 0.25 * space
    layers.vessel_keep *= 1.0 - space
    line_w = max(0.0025, 0.9 / layers.frame.size)  # thin, but never thinner than a pixel
    layers.dense += 0.35 * np.exp(-(((wall - gap) / line_w) ** 2)) * lung_side
    if ptx.size == "large":  # the collapsed lung holds less air
        layers.opacify((1.0 - space) * lung_side, 0.3)


def _blob(layers: Layers, sign: int, s0: float, v0: float, rs: float, rv: float) -> np.ndarray:
    a = layers.anat
    dx = (layers.X - a.x_at(sign, s0)) / (rs * a.hw)
    dy = (layers.Y - a.y_at(v0)) / (rv * a.H)
    return np.clip(1.4 * np.exp(-((dx * dx + dy * dy) ** 2)), 0.0, 1.0)


def draw_consolidation(layers: Layers, cons: Consolidation, rng: np.random.Generator) -> None:
    a = layers.anat
    sign = side_sign(lobe_side(cons.lobe))
    lobe = cons.lobe.split(" ", 1)[-1]
    right_x, left_x, _, _ = a.heart_extent()
    border_s = abs((right_x if sign < 0 else left_x) - a.cx) / a.hw
    region = layers.lung
    if lobe == "upper lobe":
        fissure = 0.42 if sign < 0 else 0.47
        edge = 0.004 if sign < 0 else 0.05  # the right has a horizontal fissure, sharp
        shape = soft((fissure - layers.v) * a.H, edge) * soft(layers.v * a.H + 0.02, 0.03)
    elif lobe in ("middle lobe", "lingula"):
        shape = _blob(layers, sign, border_s + 0.05, 0.6, 0.4, 0.2)
        if sign < 0:
            shape = shape * soft((layers.v - 0.42) * a.H, 0.004)
    else:  # lower lobes, seen over the hemidiaphragm and behind the heart on the left
        shape = _blob(layers, sign, 0.6, 0.82, 0.6, 0.33)
        region = layers.cavity if sign > 0 else layers.lung
    texture = np.clip(0.9 + 0.2 * smooth_noise(rng, layers.frame.size, 9), 0.6, 1.0)
    mask = shape * region * layers.side(sign) * texture
    layers.opacify(mask, 0.95)
    layers.dense += 0.06 * mask
    if rng.random() < 0.6:  # air bronchograms: dark branching airways inside the opacity
        im, d = layers.frame.canvas()
        hx, hy = a.hilum(sign)
        for _ in range(3):
            ang = rng.uniform(-0.9, 0.9) + (0.0 if lobe != "lower lobe" else 0.9)
            if lobe == "upper lobe":
                ang -= 1.2
            pts = [(hx, hy)]
            for k in range(1, 5):
                x = hx + sign * math.cos(ang) * 0.05 * k
                pts.append((x, hy + math.sin(ang) * 0.05 * k))
                ang += rng.uniform(-0.2, 0.2)
            d.line(layers.frame.to_px(np.array(pts[1:])), fill=255, width=layers.frame.width(0.008))
        layers.extra_air += 0.16 * layers.frame.layer(im, layers.frame.px(0.004)) * mask


def nodule_centre(a: Anatomy, nod: Nodule, rng: np.random.Generator) -> tuple[float, float]:
    sign = side_sign(nod.side)
    v = {"upper": 0.22, "mid": 0.5, "lower": 0.75}[nod.zone] + rng.uniform(-0.04, 0.04)
    s = rng.uniform(0.45, 0.72)
    if nod.zone == "lower" and sign > 0:  # keep it lateral to a big left heart border
        _, left_x, _, _ = a.heart_extent()
        s = min(max(s, (left_x - a.cx) / a.hw + 0.1), 0.85)
    return a.point(sign, s, v)


def draw_nodule(layers: Layers, nod: Nodule, rng: np.random.Generator) -> None:
    a = layers.anat
    x0, y0 = nodule_centre(a, nod, rng)
    r = nod.size_mm / 2.0 * (2.0 * a.hw) / THORAX_MM
    dx, dy = layers.X - x0, layers.Y - y0
    rho = np.sqrt(dx * dx + dy * dy) / r
    if nod.is_mass:  # lobulated outline
        theta = np.arctan2(dy, dx)
        ph = rng.uniform(0, 2 * math.pi, 2)
        rho = rho / (1.0 + 0.1 * np.sin(3 * theta + ph[0]) + 0.06 * np.sin(5 * theta + ph[1]))
    sphere = np.sqrt(np.clip(1.0 - rho * rho, 0.0, 1.0))
    edge = soft(1.0 - rho, 0.12)
    layers.opacify(edge * layers.cavity, 0.9)
    layers.dense += 0.35 * sphere + 0.12 * edge


def draw_edema(layers: Layers, ed: Edema, rng: np.random.Generator) -> None:
    a = layers.anat
    w = EDEMA_STRENGTH[ed.severity]
    haze = np.zeros_like(layers.X)
    for sign in (-1, 1):
        hx, hy = a.hilum(sign)
        sx, sy = a.hw * (0.45 + 0.35 * w), a.H * (0.28 + 0.2 * w)
        g = np.exp(-(((layers.X - hx) / sx) ** 2 + ((layers.Y - hy) / sy) ** 2))
        haze = np.maximum(haze, g)
    texture = np.clip(0.85 + 0.2 * smooth_noise(rng, layers.frame.size, 12), 0.5, 1.0)
    layers.opacify(haze * texture * layers.cavity, w)
    # interstitial fluid: a fine reticular opacity through both lungs, basal more than apical
    reticular = np.clip(0.5 + 0.5 * smooth_noise(rng, layers.frame.size, 40), 0.0, 1.0)
    basal = 0.5 + 0.5 * np.clip(layers.v, 0.0, 1.0)
    layers.opacify(reticular * basal * layers.lung, 0.45 * w)
    # Kerley B lines: short horizontal septal lines at both lateral bases
    im, d = layers.frame.canvas()
    for sign in (-1, 1):
        for _ in range(4 + int(5 * w)):
            v = rng.uniform(0.62, 0.9)
            s = 1.0 - 0.36 * (1.0 - v) ** 2 - 0.01
            x0, y0 = a.point(sign, s, v)
            pts = np.array([[x0, y0], [x0 - sign * rng.uniform(0.025, 0.045), y0]])
            d.line(layers.frame.to_px(pts), fill=255, width=layers.frame.width(0.004))
    layers.dense += 0.22 * layers.frame.layer(im, layers.frame.px(0.0015)) * layers.lung


def draw_atelectasis(layers: Layers, atel: Atelectasis, rng: np.random.Generator) -> None:
    a = layers.anat
    sides = (-1, 1) if atel.side == "bilateral" else (side_sign(atel.side),)
    im, d = layers.frame.canvas()
    for sign in sides:
        y_dome = a.dome_top(sign)
        y = y_dome - rng.uniform(0.045, 0.065)
        tilt = rng.uniform(-0.02, 0.03)
        s = np.linspace(0.3, 0.92, 8)
        ys = y + tilt * (s - 0.6) + 0.015 * np.sin(np.pi * (s - 0.3) / 0.62)
        pts = np.stack([a.cx + sign * s * a.hw, ys], 1)
        d.line(layers.frame.to_px(pts), fill=255, width=layers.frame.width(0.024), joint="curve")
    band = layers.frame.layer(im, layers.frame.px(0.004))
    layers.opacify(band * layers.cavity, 0.95)
    layers.dense += 0.06 * band * layers.cavity


def draw_devices(layers: Layers, devices: tuple[str, ...], rng: np.random.Generator) -> None:
    a, f = layers.anat, layers.frame
    im, d = f.canvas()
    carina_y = a.y_at(0.36)
    svc_x = a.cx - a.hw * (a.med_w - 0.05)
    if "endotracheal tube" in devices:
        cm = 2.0 * a.hw / (THORAX_MM / 10.0)
        tip = carina_y - rng.uniform(3.0, 6.0) * cm  # 3-6 cm above the carina
        path = spline([(a.cx + 0.03, -0.05), (a.cx + 0.006, a.apex_y), (a.cx - 0.002, tip)], 12)
        d.line(f.to_px(path), fill=110, width=f.width(0.024))
        d.line(f.to_px(path + np.array([0.007, 0.0])), fill=255, width=f.width(0.006))
    if "central venous catheter" in devices:
        tip = (svc_x + 0.005, a.y_at(0.5) + rng.uniform(-0.03, 0.03))
        if rng.random() < 0.7:  # right internal jugular
            path = [(a.cx - 0.11, -0.05), (a.cx - 0.085, a.clavicle_med_y), (svc_x, a.y_at(0.3))]
        else:  # left subclavian, crossing to the SVC
            path = [
                (a.x_at(+1, 1.05), a.clavicle_med_y + 0.04),
                (a.x_at(+1, 0.35), a.clavicle_med_y + 0.03),
                (a.cx, a.y_at(0.28)),
                (svc_x, a.y_at(0.36)),
            ]
        d.line(f.to_px(spline([*path, tip])), fill=255, width=f.width(0.009))
    if "pacemaker" in devices:
        gx, gy = a.x_at(+1, 0.8), a.clavicle_lat_y + 0.1
        gw, gh = 0.05, 0.036
        d.rounded_rectangle(f.box(gx, gy, gw, gh), radius=f.px(0.015), fill=255)
        # leads: subclavian vein -> SVC -> right atrium -> (one) across to the RV apex
        right_x, left_x, top_y, bottom_y = a.heart_extent()
        ra = (a.cx - 0.35 * (a.cx - right_x), top_y + 0.55 * (bottom_y - top_y))
        rv_apex = (a.cx + 0.6 * (left_x - a.cx), bottom_y - 0.05)
        vein = [
            (gx - gw, gy),
            (a.x_at(+1, 0.35), a.clavicle_med_y + 0.035),
            (svc_x, a.y_at(0.4)),
        ]
        w = f.width(0.008)
        ventricular = [*vein, ra, (a.cx, bottom_y - 0.03), rv_apex]
        d.line(f.to_px(spline(ventricular, 60)), fill=255, width=w)
        atrial = [*vein, (svc_x - 0.01, ra[1] - 0.02), (ra[0] + 0.02, ra[1] - 0.07)]
        d.line(f.to_px(spline(atrial, 50)), fill=255, width=w)
    layers.dense += 1.3 * f.layer(im, f.px(0.002))
