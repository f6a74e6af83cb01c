"""Evaluation figures drawn with Pillow only: an image strip and small-multiple bar charts of the results.

Nothing here needs matplotlib. The figure has two parts:

* a strip of labelled panels, the first image of each batch side by side
  (``clean | protected | purified | generated``);
* one small bar chart per metric, one bar per label (the mean over that
  label's runs, with a whisker of ± one standard deviation when it has
  several), so methods written to the same results file compare at a glance.
  Each chart has its own scale; where the clean images have the same metric
  (e.g. ``clean/brisque`` for ``generated/brisque``) a dashed line marks it.

Example:
    >>> tables = {"advdm": [{"protected/psnr": 33.1}], "antipure": [{"protected/psnr": 34.0}]}
    >>> img = evaluation_figure([("clean", torch.rand(1, 3, 64, 64))], tables)
    >>> img.shape[:2]
    torch.Size([1, 3])
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .common import to_rgb
from .report import format_value

# 8-bit metrics repeat their [0, 1] twins; plotting both wastes panels
HIDDEN_METRICS = ("linf", "l2")
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (200, 200, 200)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable font
    except TypeError:
        return ImageFont.load_default()


def _bbox(text: str, font) -> tuple[int, int, int, int]:
    if hasattr(font, "getbbox"):
        return font.getbbox(text)
    w, h = font.getsize(text)  # Pillow < 9.2 bitmap fonts
    return 0, 0, w, h


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    box = _bbox(text, font)
    return box[2] - box[0]


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, anchor: str = "lt",
          background: tuple[int, int, int] | None = None) -> None:
    """Draw ``text`` with its bounding box anchored at ``xy`` (``anchor``: l/m/r then t/m/b).

    Positioned by hand because Pillow's ``anchor`` argument needs a TrueType
    font, and the fallback bitmap font of older Pillow has none.
    """
    x0, y0, x1, y1 = _bbox(text, font)
    x = xy[0] - x0 - {"l": 0, "m": (x1 - x0) / 2, "r": x1 - x0}[anchor[0]]
    y = xy[1] - y0 - {"t": 0, "m": (y1 - y0) / 2, "b": y1 - y0}[anchor[1]]
    if background is not None:  # keeps a value readable over a reference line
        draw.rectangle((round(x) + x0 - 1, round(y) + y0, round(x) + x1, round(y) + y1), fill=background)
    draw.text((round(x), round(y)), text, fill=INK, font=font)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis so that it fits in ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def to_number(v) -> float | None:
    """A plottable number from a results cell (``"inf"`` strings from JSON included), else ``None``."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return None if math.isnan(v) else float(v)
    if isinstance(v, str) and v.strip().lower() in ("inf", "-inf", "+inf"):
        return float(v)
    return None


def summarize(tables: Mapping[str, Sequence[Mapping]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Per label and metric: ``(mean, std, n)`` over the runs that have a number for it.

    ``tables`` is ``{label: [row, ...]}`` as :func:`~antipure_core.metrics.report.append_results`
    returns it. Cells that are not numbers (``"not available: ..."``) are
    skipped; a metric with no number in any run of a label is absent for it.
    ``inf`` stays ``inf`` (std 0) when every run is ``inf``; mixed runs
    average the finite ones only and ``n`` counts those.
    """
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for label, rows in tables.items():
        values: dict[str, list[float]] = {}
        for row in rows:
            for k, v in row.items():
                num = to_number(v)
                if num is not None:
                    values.setdefault(k, []).append(num)
        stats = {}
        for k, vs in values.items():
            finite = [v for v in vs if math.isfinite(v)]
            if not finite:
                stats[k] = (vs[0], 0.0, len(vs))
                continue
            a = np.asarray(finite, dtype=np.float64)
            stats[k] = (float(a.mean()), float(a.std()), len(finite))
        out[label] = stats
    return out


def to_pil(x: Tensor) -> Image.Image:
    """One ``(3, H, W)`` image in [0, 1] -> an RGB PIL image."""
    a = torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def from_pil(img: Image.Image) -> Tensor:
    """An RGB PIL image -> ``(1, 3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def image_strip(panels: Sequence[tuple[str, Tensor]], width: int = 1024, max_height: int = 256,
                caption: int = 22) -> Image.Image:
    """The first image of each ``(name, (B, C, H, W))`` batch side by side, each under its name.

    Panels share the strip's ``width`` equally; each image keeps its aspect
    ratio inside a ``width / n x max_height`` box (the caption adds
    ``caption`` pixels above). Batch sizes above one are noted in the caption.
    """
    if not panels:
        raise ValueError("panels: need at least one (name, image) pair")
    n = len(panels)
    gap = 8
    box_w = (width - gap * (n + 1)) // n
    if box_w < 16:
        raise ValueError(f"width: {width} px is too narrow for {n} panels")
    thumbs = []
    for name, x in panels:
        x = to_rgb(x, name)
        img = to_pil(x[0])
        scale = min(box_w / img.width, max_height / img.height)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST  # keep δ pixels crisp
        title = name if x.shape[0] == 1 else f"{name} (1 of {x.shape[0]})"
        thumbs.append((title, img.resize(size, resample)))
    height = caption + max(t.height for _, t in thumbs) + gap
    strip = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    font = _font(15)
    for i, (title, t) in enumerate(thumbs):
        left = gap + i * (box_w + gap)
        _text(draw, (left + box_w / 2, caption / 2), _fit(draw, title, font, box_w), font, "mm")
        strip.paste(t, (left + (box_w - t.width) // 2, caption))
    return strip


def _reference_key(metric: str) -> str | None:
    group, _, name = metric.partition("/")
    return f"clean/{name}" if name and group != "clean" else None


def _bar_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], metric: str,
               bars: list[tuple[tuple[int, int, int], tuple[float, float, int] | None]],
               reference: float | None, fonts) -> None:
    """One chart in ``box = (left, top, right, bottom)``: a bar per label, value on top, optional dashed reference."""
    title_font, value_font = fonts
    left, top, right, bottom = box
    draw.rectangle(box, outline=GRID)
    _text(draw, ((left + right) / 2, top + 4), _fit(draw, metric, title_font, right - left - 8), title_font, "mt")
    plot_top, plot_bottom = top + 40, bottom - 8
    finite = [s[0] + d * s[1] for _, s in bars if s is not None and math.isfinite(s[0]) for d in (-1, 1)]
    finite += [reference] if reference is not None and math.isfinite(reference) else []
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    if hi - lo < 1e-12:
        hi = lo + 1.0
    span = (hi - lo) * 1.1

    def y(v: float) -> float:
        v = min(max(v, lo), hi)
        return plot_bottom - (v - lo) / span * (plot_bottom - plot_top)

    zero = y(0.0)
    draw.line((left + 4, zero, right - 4, zero), fill=GRID)
    if reference is not None and math.isfinite(reference):
        ry = y(reference)
        for x0 in range(left + 4, right - 4, 8):
            draw.line((x0, ry, min(x0 + 4, right - 4), ry), fill=INK)
        # the key goes under the title, where no bar or value can cover it
        for x0 in (left + 8, left + 16):
            draw.line((x0, top + 29, x0 + 4, top + 29), fill=INK)
        _text(draw, (left + 24, top + 29), f"clean images: {format_value(reference)}", value_font, "lm")
    n = len(bars)
    slot = (right - left - 16) / n
    bar_w = max(2.0, min(slot * 0.7, 48.0))
    for i, (color, stat) in enumerate(bars):
        cx = left + 8 + slot * (i + 0.5)
        if stat is None:
            _text(draw, (cx, zero - 2), "n/a", value_font, "mb")  # this label has no number for the metric
            continue
        mean, std, count = stat
        top_v = y(hi) if math.isinf(mean) and mean > 0 else y(lo) if math.isinf(mean) else y(mean)
        y0, y1 = sorted((zero, top_v))
        draw.rectangle((cx - bar_w / 2, y0, cx + bar_w / 2, max(y1, y0 + 1)), fill=color)
        if count > 1 and std > 0 and math.isfinite(mean):
            draw.line((cx, y(mean - std), cx, y(mean + std)), fill=INK, width=1)
            draw.line((cx - 3, y(mean + std), cx + 3, y(mean + std)), fill=INK)
            draw.line((cx - 3, y(mean - std), cx + 3, y(mean - std)), fill=INK)
        text = format_value(mean)
        if _text_width(draw, text, value_font) <= slot + 2:
            anchor_y = min(y0, y(mean + std) if count > 1 and math.isfinite(mean) else y0)
            _text(draw, (cx, anchor_y - 2), text, value_font, "mb", background=BACKGROUND)


def metric_bars(tables: Mapping[str, Sequence[Mapping]], metrics: Sequence[str] | None = None, width: int = 1024,
                columns: int = 4, panel_height: int = 170) -> Image.Image | None:
    """Small-multiple bar charts of ``{label: [row, ...]}``: one chart per metric, one bar (mean ± std) per label.

    ``metrics`` defaults to every numeric metric in the tables except the
    ``clean/*`` ones (drawn as dashed reference lines in the matching charts)
    and the [0, 1]-unit twins of the 8-bit norms. A legend row names each
    label's colour and run count. Returns ``None`` when there is nothing numeric to plot.
    """
    stats = summarize(tables)
    labels = [lab for lab in tables if tables[lab]]
    if metrics is None:
        metrics = []
        for lab in labels:
            for row in tables[lab]:
                for k in row:
                    group, _, name = k.partition("/")
                    if (k not in metrics and group != "clean" and name not in HIDDEN_METRICS
                            and any(k in stats[la] for la in labels)):
                        metrics.append(k)
    if not metrics or not labels:
        return None
    columns = max(1, min(columns, len(metrics)))
    gap = 8
    panel_w = (width - gap * (columns + 1)) // columns
    rows = math.ceil(len(metrics) / columns)
    legend_h = 26
    img = Image.new("RGB", (width, legend_h + rows * (panel_height + gap) + gap), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fonts = (_font(13), _font(11))
    legend_font = _font(14)
    x = gap
    for i, lab in enumerate(labels):
        color = PALETTE[i % len(PALETTE)]
        text = f"{lab} ({len(tables[lab])} run{'s' if len(tables[lab]) != 1 else ''})"
        draw.rectangle((x, 8, x + 12, 20), fill=color)
        _text(draw, (x + 16, 14), text, legend_font, "lm")
        x += 16 + _text_width(draw, text, legend_font) + 16
    for j, metric in enumerate(metrics):
        r, c = divmod(j, columns)
        left = gap + c * (panel_w + gap)
        top = legend_h + gap + r * (panel_height + gap)
        bars = [(PALETTE[i % len(PALETTE)], stats[lab].get(metric)) for i, lab in enumerate(labels)]
        ref_key = _reference_key(metric)
        refs = [stats[lab][ref_key][0] for lab in labels if ref_key and ref_key in stats[lab]]
        reference = float(np.mean(refs)) if refs and all(math.isfinite(v) for v in refs) else None
        _bar_panel(draw, (left, top, left + panel_w, top + panel_height), metric, bars, reference, fonts)
    return img


def evaluation_figure(panels: Sequence[tuple[str, Tensor]], tables: Mapping[str, Sequence[Mapping]],
                      width: int = 1024) -> Tensor:
    """The image strip of ``panels`` above the bar charts of ``tables``, as one ``(1, 3, H, W)`` image in [0, 1].

    Args:
        panels: ``(name, (B, C, H, W) image)`` pairs, drawn left to right.
        tables: ``{label: [row, ...]}`` results (e.g. every run in one results file).
        width: figure width in pixels (>= 256).
    """
    if width < 256:
        raise ValueError(f"width: must be at least 256 px, got {width}")
    parts = [image_strip(panels, width)]
    bars = metric_bars(tables, width=width)
    if bars is not None:
        parts.append(bars)
    fig = Image.new("RGB", (width, sum(p.height for p in parts)), BACKGROUND)
    y = 0
    for p in parts:
        fig.paste(p, (0, y))
        y += p.height
    return from_pil(fig)
