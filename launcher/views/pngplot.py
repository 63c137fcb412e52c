"""A small line plot written as a PNG with numpy and zlib only, for `macrun benchmark --plot`.

macrun does not depend on matplotlib or Pillow, and a benchmark plot needs little: axes, a grid, a log-2
x axis, a few coloured lines with markers, tick labels and a legend. Text uses a built-in 5×7 bitmap font
(upper case, digits and a little punctuation), drawn at twice its size. The PNG is RGB, 8 bits, one IDAT
chunk, filter 0 on every row (PNG specification, W3C 2003).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Each glyph: 7 rows, top first; bit 4 is the leftmost of 5 columns.
_FONT: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E), "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F), "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02), "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E), "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E), "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11), "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E), "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F), "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F), "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E), "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11), "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11), "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D), "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E), "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A), "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04), "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    " ": (0, 0, 0, 0, 0, 0, 0), ".": (0, 0, 0, 0, 0, 0x0C, 0x0C), "-": (0, 0, 0, 0x1F, 0, 0, 0),
    "/": (0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10), "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08), ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03), "_": (0, 0, 0, 0, 0, 0, 0x1F),
    "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0), ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
}
_MISSING = (0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
_SCALE = 2  # font pixels per glyph dot
_GLYPH_W = 6 * _SCALE  # 5 columns and one of spacing


class Canvas:
    """An RGB image being drawn on; (x, y) with y downwards."""

    def __init__(self, width: int, height: int) -> None:
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)
        self.width, self.height = width, height

    def rect(self, x0: float, y0: float, x1: float, y1: float, colour: Sequence[int]) -> None:
        """Fill the rectangle between two corners (clipped to the image)."""
        xa, xb = sorted((int(round(x0)), int(round(x1))))
        ya, yb = sorted((int(round(y0)), int(round(y1))))
        xa, ya = max(xa, 0), max(ya, 0)
        xb, yb = min(xb, self.width - 1), min(yb, self.height - 1)
        if xa <= xb and ya <= yb:
            self.pixels[ya:yb + 1, xa:xb + 1] = colour

    def line(self, x0: float, y0: float, x1: float, y1: float, colour: Sequence[int], width: int = 1,
             dash: int = 0) -> None:
        """A straight line `width` pixels thick; `dash` > 0 draws dashes of that length."""
        steps = max(int(math.hypot(x1 - x0, y1 - y0) * 2), 1)
        half = (width - 1) / 2
        for i in range(steps + 1):
            if dash and (i // (2 * dash)) % 2:
                continue
            x, y = x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps
            self.rect(x - half, y - half, x + half, y + half, colour)

    def text(self, x: float, y: float, text: str, colour: Sequence[int] = (0, 0, 0), *, anchor: str = "left",
             vertical: bool = False) -> None:
        """Draw `text` with its top-left (or its centre/right end, per `anchor`) at (x, y)."""
        text = text.upper()
        x, y = round(x), round(y)  # whole pixels, so every dot of the font is equally wide
        length = len(text) * _GLYPH_W
        offset = {"left": 0, "centre": length / 2, "right": length}[anchor]
        for k, char in enumerate(text):
            rows = _FONT.get(char, _MISSING)
            for r, bits in enumerate(rows):
                for c in range(5):
                    if bits & (0x10 >> c):
                        along = k * _GLYPH_W + c * _SCALE - offset
                        if vertical:  # read bottom to top
                            self.rect(x + r * _SCALE, y - along - _SCALE + 1, x + r * _SCALE + _SCALE - 1,
                                      y - along, colour)
                        else:
                            self.rect(x + along, y + r * _SCALE, x + along + _SCALE - 1, y + r * _SCALE + _SCALE - 1,
                                      colour)

    def png(self) -> bytes:
        """The image as PNG bytes."""
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        rows = np.concatenate([np.zeros((self.height, 1), dtype=np.uint8),
                               self.pixels.reshape(self.height, self.width * 3)], axis=1)
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
                + chunk(b"IEND", b""))


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least `top`."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks spanning [low, high] (both > 0) for a log axis."""
    ticks: list[float] = []
    decade = 10.0 ** math.floor(math.log10(low))
    while not ticks or ticks[-1] < high:
        for m in (1, 2, 5):
            if m * decade >= low / 5 ** 0.5 and (not ticks or ticks[-1] < high):
                ticks.append(m * decade)
        decade *= 10
    if len(ticks) > 9:  # many decades: label only the powers of ten
        ticks = [t for t in ticks if f"{t:.0e}".startswith("1")]
        if ticks[-1] < high:
            ticks.append(ticks[-1] * 10)
    return ticks


def _tick_label(value: float) -> str:
    return f"{value:g}" if value >= 1 or value == 0 else f"{value:.2g}"


def line_plot(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], path: Path, *, title: str,
              x_label: str, y_label: str, x_tick_label: object = str,
              guides: Sequence[tuple[str, float]] = (), width: int = 900, height: int = 540,
              x_ticks: Sequence[float] | None = None, y_range: tuple[float, float] | None = None) -> Path:
    """Plot each (label, [(x, y), ...]) as a line on a log-2 x axis and write a PNG to `path`.

    `guides` are dashed horizontal lines (label, y), e.g. a link's measured throughput, drawn in the colour
    of the series with the same index. `x_tick_label` turns an x value into its tick's text. `x_ticks`
    replaces the default (a tick at every x of the data: right for a few sizes, a clutter for curves of
    many points). `y_range` (low, high) zooms a linear y axis that would otherwise start at 0, where
    curves that differ by a few percent (validation losses) would look alike.
    """
    canvas = Canvas(width, height)
    left, right, top, bottom = 104, width - 30, 50, height - 120
    xs = sorted({x for _, points in series for x, _ in points if x > 0})
    if not xs:
        raise ValueError("nothing to plot")
    tick_xs = sorted(x for x in x_ticks if x > 0) if x_ticks is not None else xs
    xs = sorted({*xs, *tick_xs})
    ys = [y for _, points in series for _, y in points] + [y for _, y in guides]
    positive = [y for y in ys if y > 0]
    # Figures spanning more than ~30x (Wi-Fi beside Thunderbolt, bytes beside megabytes) need a log axis.
    log_y = y_range is None and bool(positive) and len(positive) == len(ys) and max(positive) / min(positive) > 30
    ticks = log_ticks(min(positive), max(positive)) if log_y else nice_ticks(max(ys) * 1.05 if ys else 1.0)
    if y_range is not None:
        step = nice_ticks(y_range[1] - y_range[0])[1]
        first = math.floor(y_range[0] / step) * step
        ticks = [first + i * step for i in range(int(math.ceil((y_range[1] - first) / step - 1e-9)) + 1)]
    lo, hi = math.log2(xs[0]), math.log2(xs[-1])
    span = hi - lo or 1.0
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)

    def px(x: float) -> float:
        return left + (math.log2(x) - lo) / (hi - lo or span) * (right - left)

    def py(y: float) -> float:
        if log_y:
            low, high = math.log10(ticks[0]), math.log10(ticks[-1])
            return bottom - (math.log10(max(y, ticks[0])) - low) / (high - low) * (bottom - top)
        if y_range is not None:  # a zoomed axis clips what falls outside it
            y = min(max(y, ticks[0]), ticks[-1])
        return bottom - (y - ticks[0]) / (ticks[-1] - ticks[0]) * (bottom - top)

    grey, dark = (225, 225, 225), (60, 60, 60)
    for t in ticks:
        canvas.line(left, py(t), right, py(t), grey)
        canvas.text(left - 8, py(t) - 7, _tick_label(t), dark, anchor="right")
    for x in tick_xs:
        canvas.line(px(x), top, px(x), bottom, grey)
        canvas.text(px(x), bottom + 10, str(x_tick_label(x)), dark, anchor="centre")
    canvas.line(left, bottom, right, bottom, dark, 2)
    canvas.line(left, top, left, bottom, dark, 2)
    canvas.text((left + right) / 2, 14, title, (0, 0, 0), anchor="centre")
    canvas.text((left + right) / 2, bottom + 34, x_label, dark, anchor="centre")
    canvas.text(10, (top + bottom) / 2, y_label, dark, anchor="centre", vertical=True)
    for i, (_label, y) in enumerate(guides):
        canvas.line(left, py(y), right, py(y), COLOURS[i % len(COLOURS)], 1, dash=6)
    for i, (_label, points) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted((px(x), py(y)) for x, y in points if x > 0)
        for (xa, ya), (xb, yb) in zip(pts, pts[1:], strict=False):
            canvas.line(xa, ya, xb, yb, colour, 3)
        for x, y in pts:
            canvas.rect(x - 4, y - 4, x + 4, y + 4, colour)
    legend_y = bottom + 62
    entries = [(label, i, False) for i, (label, _) in enumerate(series)]
    entries += [(label, i, True) for i, (label, _) in enumerate(guides)]
    for n, (label, i, dashed) in enumerate(entries):
        y = legend_y + (n // 2) * 22
        x = left + (n % 2) * (right - left) / 2
        canvas.line(x, y + 7, x + 30, y + 7, COLOURS[i % len(COLOURS)], 1 if dashed else 3, dash=4 if dashed else 0)
        canvas.text(x + 40, y, label, dark)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canvas.png())
    return path


__all__ = ["Canvas", "line_plot", "log_ticks", "nice_ticks"]
