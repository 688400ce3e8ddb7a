"""The contact sheet: every image of the first classes as stage-1 pick | after stage 2 | their difference."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..fileio import atomic_write
from .folder import CONTACT_SHEET, quantize


SHEET_CLASSES = 25  # a sheet of 1000 classes would be too tall to look at; the first ones stand for the set
SHEET_PER_LINE = 10  # image triples per line; a class with more images continues on the next line


def contact_sheet(parts: list[dict], out: Path, max_classes: int = SHEET_CLASSES,
                  per_line: int = SHEET_PER_LINE) -> None:
    """Write ``contact_sheet.png``: one block per class (its name on the left), every image of the class as a triple
    — stage-1 pick | stage-2 result | their difference, amplified and centred on grey (grey = unchanged) — with
    p(class) before -> after under it (ASCII: the fallback font has no arrow). Column headers name the three; the title
    gives the amplification. At most
    ``max_classes`` classes are drawn (the title says so when there are more)."""
    if not parts:
        return
    import torch
    from torchvision.utils import make_grid

    shown = parts[:max_classes]
    befores, afters = [], []
    for part in shown:
        b, a = [], []
        for rec, thumb in zip(part["images"], part["stage1_thumbnails"]):
            before = Image.open(io.BytesIO(base64.b64decode(thumb))).convert("RGB")
            after = Image.open(out / rec["file"]).convert("RGB")
            if after.size != before.size:  # stage-1 thumbnails are at most THUMB_MAX wide: compare at that size
                after = after.resize(before.size, Image.Resampling.BILINEAR)
            b.append(_as_tensor(before))
            a.append(_as_tensor(after))
        befores.append(b)
        afters.append(a)
    side = max(t.shape[-1] for row in befores for t in row)
    scale = max(1, 48 // side)  # tiny images (digits: 16 px) are enlarged without blurring
    gain = _difference_gain([a - b for ra, rb in zip(afters, befores) for a, b in zip(ra, rb)])
    font = _font(11)
    pad, gap, label_w, text_h = 2, 10, _label_width(shown, font), 16
    triple_w = 3 * side * scale + 4 * pad
    lines_per_class = [max(1, -(-len(p["images"]) // per_line)) for p in shown]
    n_cols = min(per_line, max(len(p["images"]) for p in shown))
    more = f" (first {len(shown)} of {len(parts)} classes)" if len(parts) > len(shown) else ""
    title = [f"each image: stage-1 pick | after stage 2 | difference x{gain:g} (grey = unchanged){more}",
             "below it: p(class) of the pick -> after stage 2"]
    title_h, head_h = 8 + 14 * len(title), 16
    width = max(label_w + n_cols * (triple_w + gap), 8 + max(_text_width(t, font) for t in title))
    height = title_h + head_h + sum(lines_per_class) * (side * scale + 2 * pad + text_h) + 4
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, t in enumerate(title):
        draw.text((4, 4 + 14 * i), t, fill=(0, 0, 0), font=font)
    cell = side * scale + pad
    for c in range(n_cols):  # column headers
        x0 = label_w + c * (triple_w + gap) + pad
        for k, name in enumerate(("stage 1", "stage 2", f"diff x{gain:g}")):
            _centred(draw, name, x0 + k * cell, cell - pad, title_h, font, (90, 90, 90))
    y = title_h + head_h
    for part, rb, ra, n_lines in zip(shown, befores, afters, lines_per_class):
        draw.text((4, y + (side * scale) // 2 - 6), _fit(part["class_name"], label_w - 8, font), fill=(0, 0, 0),
                  font=font)
        for i, (b, a, rec) in enumerate(zip(rb, ra, part["images"])):
            line, col = divmod(i, per_line)
            diff = (0.5 + gain * (a - b)).clamp(0, 1)
            cells = [t.repeat_interleave(scale, -1).repeat_interleave(scale, -2) for t in (b, a, diff)]
            grid = make_grid(torch.stack(cells), nrow=3, padding=pad, pad_value=1.0)
            x0 = label_w + col * (triple_w + gap)
            y0 = y + line * (side * scale + 2 * pad + text_h)
            sheet.paste(Image.fromarray(quantize(grid * 2 - 1).permute(1, 2, 0).numpy()), (x0, y0))
            _centred(draw, f"p {_p(rec.get('prob_before'))} -> {_p(rec.get('prob_after'))}", x0, triple_w,
                     y0 + side * scale + 2 * pad, font, (0, 0, 0))
        y += n_lines * (side * scale + 2 * pad + text_h)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write(out / CONTACT_SHEET, buf.getvalue())


def _as_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _difference_gain(diffs: list[torch.Tensor]) -> float:
    """A round amplification (1, 2, 5, 10, 20, ...) that maps the 99th percentile of |after − before| to about
    ±0.4 around grey, so what stage 2 changed is visible however small it is."""
    if not diffs:
        return 1.0
    q = float(torch.cat([d.abs().flatten() for d in diffs]).quantile(0.99))
    if q <= 0:
        return 1.0
    want, gain = 0.4 / q, 1.0
    while gain * 10 <= want:
        gain *= 10
    for m in (5, 2):
        if gain * m <= want:
            return gain * m
    return gain


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def _text_width(text: str, font) -> int:
    box = font.getbbox(text)
    return box[2] - box[0]


def _label_width(parts: list[dict], font) -> int:
    return min(140, 12 + max(_text_width(p["class_name"], font) for p in parts))


def _fit(text: str, width: int, font) -> str:
    if _text_width(text, font) <= width:
        return text
    while len(text) > 1 and _text_width(text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _centred(draw, text: str, x: int, width: int, y: int, font, fill) -> None:
    draw.text((x + (width - _text_width(text, font)) // 2, y), text, fill=fill, font=font)


def _p(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"
