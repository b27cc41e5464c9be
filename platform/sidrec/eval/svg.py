"""Small inline-SVG charts for the self-contained run report: grouped bars and line curves.

Pure string building (no plotting library, nothing fetched); every label goes through ``html.escape``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5")
_MARGIN = {"left": 56, "right": 16, "top": 28, "bottom": 40}
_LEGEND_ROW = 18


@dataclass(frozen=True)
class Series:
    """One curve: (x, y) points in x order; ``markers`` draws a dot with a hover title per point."""

    label: str
    points: Sequence[tuple[float, float]]
    markers: bool = False
    point_titles: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class Scale:
    """Linear map of the data interval [d0, d1] onto the pixel interval [r0, r1]."""

    d0: float
    d1: float
    r0: float
    r1: float

    def __call__(self, value: float) -> float:
        span = self.d1 - self.d0 or 1.0
        return self.r0 + (self.r1 - self.r0) * (value - self.d0) / span


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (about ``count`` of them)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t < hi + step * 0.999:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _tick_label(value: float, percent: bool) -> str:
    if percent:
        return f"{value:.0%}"
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _frame(width: int, height: int, title: str, body: list[str], legend: Sequence[str]) -> str:
    rows = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height + _LEGEND_ROW * len(legend)}" '
            f'width="{width}" role="img" aria-label="{escape(title)}">',
            f'<text x="{_MARGIN["left"]}" y="16" class="chart-title">{escape(title)}</text>', *body]
    for i, label in enumerate(legend):
        y = height + _LEGEND_ROW * i + 4
        rows.append(f'<rect x="{_MARGIN["left"]}" y="{y}" width="12" height="12" fill="{PALETTE[i % len(PALETTE)]}"/>'
                    f'<text x="{_MARGIN["left"] + 18}" y="{y + 10}" class="legend">{escape(label)}</text>')
    rows.append("</svg>")
    return "\n".join(rows)


def _y_axis(ticks: list[float], y_of: Scale, width: int, percent: bool) -> list[str]:
    out = []
    for t in ticks:
        y = y_of(t)
        out.append(f'<line x1="{_MARGIN["left"]}" x2="{width - _MARGIN["right"]}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'class="grid"/><text x="{_MARGIN["left"] - 6}" y="{y + 4:.1f}" text-anchor="end" '
                   f'class="tick">{escape(_tick_label(t, percent))}</text>')
    return out


def bar_chart(categories: Sequence[str], series: dict[str, Sequence[float | None]], title: str,
              percent: bool = False, width: int = 720, height: int = 260) -> str:
    """Grouped bars: one group per category, one bar per series (None: no bar); hover shows the value."""
    values = [v for vals in series.values() for v in vals if v is not None]
    ticks = nice_ticks(0.0, max(values, default=0.0) or 1.0)
    top, bottom = _MARGIN["top"], height - _MARGIN["bottom"]
    y_of = Scale(0.0, ticks[-1], bottom, top)
    body = _y_axis(ticks, y_of, width, percent)
    group_w = (width - _MARGIN["left"] - _MARGIN["right"]) / max(len(categories), 1)
    bar_w = group_w * 0.8 / max(len(series), 1)
    for c, cat in enumerate(categories):
        x0 = _MARGIN["left"] + c * group_w + group_w * 0.1
        body.append(f'<text x="{x0 + group_w * 0.4:.1f}" y="{bottom + 16}" text-anchor="middle" '
                    f'class="tick">{escape(cat)}</text>')
        for s, (name, vals) in enumerate(series.items()):
            v = vals[c]
            if v is None:
                continue
            y = y_of(v)
            shown = f"{v:.1%}" if percent else f"{v:.4f}"
            body.append(f'<rect x="{x0 + s * bar_w:.1f}" y="{y:.1f}" width="{bar_w * 0.92:.1f}" '
                        f'height="{bottom - y:.1f}" fill="{PALETTE[s % len(PALETTE)]}">'
                        f'<title>{escape(f"{name} {cat}: {shown}")}</title></rect>')
    return _frame(width, height, title, body, list(series))


def _polyline(points: Sequence[tuple[float, float]], x_of: Scale, y_of: Scale, color: str) -> str:
    coords = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in points)
    return f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"/>'


def line_chart(series: Sequence[Series], title: str, x_label: str, width: int = 720, height: int = 280) -> str:
    """Curves over a shared x axis; series with ``markers`` get a dot per point with its title on hover."""
    pts = [p for s in series for p in s.points]
    if not pts:
        return ""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_ticks = nice_ticks(min(0.0, min(ys)), max(ys))
    top, bottom = _MARGIN["top"], height - _MARGIN["bottom"]
    left, right = _MARGIN["left"], width - _MARGIN["right"]
    x_of, y_of = Scale(x_lo, x_hi, left, right), Scale(y_ticks[0], y_ticks[-1], bottom, top)
    body = _y_axis(y_ticks, y_of, width, percent=False)
    for t in nice_ticks(x_lo, x_hi):
        if x_lo <= t <= x_hi:
            body.append(f'<text x="{x_of(t):.1f}" y="{bottom + 16}" text-anchor="middle" '
                        f'class="tick">{escape(_tick_label(t, False))}</text>')
    body.append(f'<text x="{(left + right) / 2:.1f}" y="{bottom + 32}" text-anchor="middle" '
                f'class="tick">{escape(x_label)}</text>')
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        if len(s.points) > 1:
            body.append(_polyline(s.points, x_of, y_of, color))
        if s.markers or len(s.points) == 1:
            for j, (x, y) in enumerate(s.points):
                label = s.point_titles[j] if j < len(s.point_titles) else f"{s.label} {x:g}: {y:.4f}"
                body.append(f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="3" fill="{color}">'
                            f'<title>{escape(label)}</title></circle>')
    return _frame(width, height, title, body, [s.label for s in series])


def downsample(points: Sequence[tuple[float, float]], limit: int = 400) -> list[tuple[float, float]]:
    """At most ``limit`` evenly spaced points of a long curve, the first and last always kept."""
    if len(points) <= limit:
        return list(points)
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]
