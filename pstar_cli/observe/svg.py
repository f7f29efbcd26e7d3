"""The memory timeline of `pstar profile` as an SVG picture: per moment of the traced warm-up, the
non-model data, the chunks on the device and the budget."""

from __future__ import annotations

import math
from typing import Any

from pstar_cli.observe.metrics import format_bytes

SVG_WIDTH, SVG_HEIGHT = 900, 430
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 80, 880, 50, 360
SERIES = (  # key, label, colour
    ("non_model_bytes", "non-model data (activations, temporaries)", "#d62728"),
    ("chunk_bytes_device", "chunks on the device", "#1f77b4"),
    ("device_total_bytes", "both together", "#9467bd"),
    ("budget_bytes", "chunk budget", "#2ca02c"),
)


def series_value(moment: dict[str, Any], key: str) -> int:
    if key == "device_total_bytes":
        return (moment.get("non_model_bytes") or 0) + (moment.get("chunk_bytes_device") or 0)
    return moment.get(key) or 0


def memory_timeline_svg(timeline: list[dict[str, Any]], title: str) -> str:
    """A self-contained SVG line chart of the memory timeline (bytes per moment)."""
    num_moments = max(len(timeline), 1)
    values = [series_value(m, key) for m in timeline for key, _, _ in SERIES]
    top_bytes = nice_ceiling(max(values, default=0))
    x_of = lambda i: PLOT_LEFT + (PLOT_RIGHT - PLOT_LEFT) * (i / max(num_moments - 1, 1))  # noqa: E731
    y_of = lambda b: PLOT_BOTTOM - (PLOT_BOTTOM - PLOT_TOP) * (b / top_bytes)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{SVG_HEIGHT}" '
        f'viewBox="0 0 {SVG_WIDTH} {SVG_HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{SVG_WIDTH}" height="{SVG_HEIGHT}" fill="white"/>',
        f'<text x="{PLOT_LEFT}" y="24" font-size="15">{escape(title)}</text>',
    ]
    parts += axis_elements(top_bytes, num_moments, y_of)
    for key, label, colour in SERIES:
        points = " ".join(f"{x_of(i):.1f},{y_of(series_value(m, key)):.1f}" for i, m in enumerate(timeline))
        if points:
            parts.append(f'<polyline data-series="{key}" fill="none" stroke="{colour}" stroke-width="2" '
                         f'points="{points}"><title>{escape(label)}</title></polyline>')
    parts += legend_elements()
    if not timeline:
        parts.append(f'<text x="{PLOT_LEFT + 20}" y="{PLOT_TOP + 30}">the engine recorded no moments</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def axis_elements(top_bytes: float, num_moments: int, y_of) -> list[str]:

    parts = [
        f'<line x1="{PLOT_LEFT}" y1="{PLOT_BOTTOM}" x2="{PLOT_RIGHT}" y2="{PLOT_BOTTOM}" stroke="black"/>',
        f'<line x1="{PLOT_LEFT}" y1="{PLOT_TOP}" x2="{PLOT_LEFT}" y2="{PLOT_BOTTOM}" stroke="black"/>',
    ]
    for tick in range(5):
        tick_bytes = top_bytes * tick / 4
        y = y_of(tick_bytes)
        parts.append(f'<line x1="{PLOT_LEFT}" y1="{y:.1f}" x2="{PLOT_RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{PLOT_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{format_bytes(tick_bytes)}</text>')
    parts.append(f'<text x="{PLOT_LEFT}" y="{PLOT_BOTTOM + 18}">0</text>')
    parts.append(f'<text x="{PLOT_RIGHT}" y="{PLOT_BOTTOM + 18}" text-anchor="end">{num_moments - 1}</text>')
    parts.append(f'<text x="{(PLOT_LEFT + PLOT_RIGHT) / 2}" y="{PLOT_BOTTOM + 18}" text-anchor="middle">'
                 "moment of the warm-up step (each hook of forward and backward)</text>")
    return parts


def legend_elements() -> list[str]:
    parts = []
    for index, (_, label, colour) in enumerate(SERIES):
        x = PLOT_LEFT + (index % 2) * 360
        y = PLOT_BOTTOM + 38 + (index // 2) * 16
        parts.append(f'<rect x="{x}" y="{y - 9}" width="14" height="4" fill="{colour}"/>')
        parts.append(f'<text x="{x + 20}" y="{y}">{escape(label)}</text>')
    return parts


def nice_ceiling(num_bytes: float) -> float:
    """Axis top: the smallest 1, 2 or 5 x 10^k KiB/MiB/GiB/... at or above num_bytes."""
    if num_bytes <= 0:
        return 1.0
    unit = 1024 ** min(4, int(math.log(num_bytes, 1024)))
    scaled = num_bytes / unit  # in [1, 1024)
    magnitude = 10 ** math.floor(math.log10(scaled))
    step = next(step for step in (1, 2, 5, 10) if scaled <= step * magnitude * (1 + 1e-12))
    return step * magnitude * unit


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
