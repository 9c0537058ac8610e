"""Contact sheets: a PNG grid of studies with a caption under each, for people to look at."""

from __future__ import annotations

import io
import logging
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from cxrlite.data.labels import NEGATIVE, POSITIVE, StudyLabels
from cxrlite.data.records import Study
from cxrlite.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

_SIDE = {"left": "L", "right": "R", "bilateral": "bilat"}
_LOBE = {
    "right upper lobe": "RUL",
    "right middle lobe": "RML",
    "right lower lobe": "RLL",
    "left upper lobe": "LUL",
    "lingula": "lingula",
    "left lower lobe": "LLL",
}
_DEVICE = {"endotracheal tube": "ETT", "central venous catheter": "CVC", "pacemaker": "PM"}


def label_findings(labels: StudyLabels) -> list[str]:
    """Short names of a phantom's positive findings, with side and severity."""
    out = []
    if labels.cardiomegaly:
        out.append(f"cardiomegaly ctr {labels.ctr:.2f}")
    if labels.effusion:
        out.append(f"effusion {_SIDE[labels.effusion.side]} {labels.effusion.size}")
    if labels.pneumothorax:
        out.append(f"PTX {_SIDE[labels.pneumothorax.side]} {labels.pneumothorax.size}")
    if labels.consolidation:
        out.append(f"consolidation {_LOBE[labels.consolidation.lobe]}")
    if labels.nodule:
        n = labels.nodule
        kind = "mass" if n.is_mass else "nodule"
        out.append(f"{kind} {_SIDE[n.side]} {n.zone} {n.size_mm}mm")
    if labels.edema:
        out.append(f"edema {labels.edema.severity}")
    if labels.atelectasis:
        out.append(f"atelectasis {_SIDE[labels.atelectasis.side]}")
    if labels.devices:
        out.append("+".join(_DEVICE[d] for d in labels.devices))
    return out


def caption(study: Study) -> str:
    """View, sex/age and positive findings (from the phantom truth, else the CheXpert labels)."""
    head = " ".join(
        part
        for part in (study.view or "?", f"{study.sex or '?'}/{study.age if study.age else '?'}")
    )
    if study.labels is not None:
        found = label_findings(study.labels)
    else:
        found = [k for k, val in study.chexpert.items() if val == POSITIVE]
        found += [f"{k}?" for k, val in study.chexpert.items() if val not in (POSITIVE, NEGATIVE)]
    return f"{head}: " + ("; ".join(found) if found else "normal")


def contact_sheet(
    studies: list[Study], root: Path, out: Path, cols: int = 6, tile: int = 256
) -> Path:
    """Write a PNG grid of the studies' images (paths relative to `root`) with captions."""
    if not studies:
        raise ValueError("contact_sheet: no studies given")
    if cols < 1 or tile < 32:
        raise ValueError(f"contact_sheet: cols must be >= 1 and tile >= 32, got {cols}, {tile}")
    font_px = max(10, tile // 18)
    font = ImageFont.load_default(size=font_px)
    chars = max(10, int(tile / (font_px * 0.55)))
    line_h = font_px + 2
    captions = [textwrap.wrap(f"{st.id}  {caption(st)}", chars)[:8] for st in studies]
    cell_h = tile + max(len(c) for c in captions) * line_h + 4
    rows = (len(studies) + cols - 1) // cols
    sheet = Image.new("L", (cols * tile, rows * cell_h), 255)
    draw = ImageDraw.Draw(sheet)
    for k, study in enumerate(studies):
        x, y = (k % cols) * tile, (k // cols) * cell_h
        path = Path(study.image) if Path(study.image).is_absolute() else Path(root) / study.image
        try:
            with Image.open(path) as im:
                sheet.paste(im.convert("L").resize((tile, tile), Image.BILINEAR), (x, y))
        except (OSError, ValueError) as e:
            raise ValueError(f"contact_sheet: cannot read image {path}: {e}") from None
        for i, line in enumerate(captions[k]):
            draw.text((x + 3, y + tile + 2 + i * line_h), line, fill=0, font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    logger.info("wrote contact sheet of %d studies to %s", len(studies), out)
    return Path(out)
