"""Pictures of relevance: a signed colour map and a PNG grid of heatmaps.

* :func:`to_rgb` colours a signed 2-D relevance map with the symmetric blue-white-red
  ("bwr") map: red = positive relevance, blue = negative, white = exactly zero.  Every
  map is scaled by its own ``max |R|``, so colours compare *within* a map, not across
  maps.
* :func:`image_to_rgb` undoes the input normalisation of an image tensor.
* :func:`save_grid` writes one PNG: a row per image, the input first, then one column
  per method, with the column titles on top and, optionally, each row's object outline
  drawn on every cell.

matplotlib is used only for its colour map and only imported when a map is coloured
(``import relprop`` stays light); nothing here opens a window.  Files are written
atomically: a temporary file in the target folder, then :func:`os.replace`, so a crash
never leaves a half-written PNG behind.
"""
from __future__ import annotations

import io
import os
import uuid
from typing import Sequence

import numpy as np

PAD = 4             # pixels between cells and around the grid
LINE_SPACING = 2    # extra pixels between lines of a title
FONT_SIZE = 12
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
OUTLINE = (0, 0, 0)

_CMAP = None


def _bwr():
    """matplotlib's "bwr" with an odd number of entries, so 0 lands exactly on white."""
    global _CMAP
    if _CMAP is None:
        os.environ.setdefault("MPLBACKEND", "Agg")   # never a display, even if pyplot loads later
        import matplotlib

        _CMAP = matplotlib.colormaps["bwr"].resampled(257)
    return _CMAP


def to_rgb(heatmap) -> np.ndarray:
    """Colour a signed 2-D map: (H, W) tensor or array -> (H, W, 3) uint8.

    Values are divided by the map's largest absolute value, so ``+max|R|`` is pure red
    (255, 0, 0), ``-max|R|`` pure blue (0, 0, 255) and 0 white; a value and its negative
    get mirrored colours (red and blue channels swapped).  An all-zero map is all white;
    NaN counts as 0.  Where the map has infinite values, those are the largest: ``+inf`` is
    pure red, ``-inf`` pure blue and every finite value white.  A complex map is an error.
    """
    if (heatmap.is_complex() if hasattr(heatmap, "is_complex") else np.iscomplexobj(heatmap)):
        raise TypeError("heatmap must be real, got a complex map")
    r = heatmap.detach().cpu().double().numpy() if hasattr(heatmap, "detach") else np.asarray(heatmap, dtype=float)
    if r.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {r.shape}")
    infinite = np.isinf(r)
    if infinite.any():
        v = np.where(infinite, np.sign(r), 0.0)
    else:
        r = np.nan_to_num(r, nan=0.0)
        scale = np.abs(r).max() if r.size else 0.0
        v = r / scale if scale > 0 else np.zeros_like(r)
    return _bwr()((v + 1.0) / 2.0, bytes=True)[..., :3]


def image_to_rgb(x, mean=None, std=None) -> np.ndarray:
    """Un-normalise an input image (3, H, W) -> (H, W, 3) uint8.

    ``x * std + mean`` per channel (``mean``/``std`` as given to the normalisation; None
    means 0 and 1), clipped to [0, 1].
    """
    a = x.detach().cpu().double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=float)
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {a.shape}")
    if std is not None:
        a = a * np.asarray(std, dtype=float).reshape(3, 1, 1)
    if mean is not None:
        a = a + np.asarray(mean, dtype=float).reshape(3, 1, 1)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder + os.replace."""
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:          # plain open: the file gets the usual umask permissions
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_grid(path, images: Sequence, heatmaps_by_column: Sequence[Sequence], column_titles: Sequence[str],
              row_titles: Sequence[str] | None = None, scale: int = 1, caption: str | None = None,
              outlines: Sequence | None = None) -> tuple[int, int]:
    """Write one PNG grid of images and their heatmaps; returns its (width, height).

    ``images``: one (H, W, 3) uint8 array per row (see :func:`image_to_rgb`).
    ``heatmaps_by_column``: one sequence per method column, each holding one signed
    (H, W) map per row (coloured with :func:`to_rgb`, each map on its own scale).
    ``column_titles``: one per column *including* the input column (so
    ``len(heatmaps_by_column) + 1``); long titles wrap at hyphens.  ``row_titles``:
    optional labels drawn left of each row.  ``scale``: integer upscaling of every cell
    (nearest neighbour, so pixels stay exact).  ``caption``: optional text under the
    grid, wrapped to its width.  ``outlines``: optional (H, W) bool mask per row; its
    outline (see :func:`outline`, at the upscaled resolution) is drawn in black on every
    cell of the row.

    Layout (no row titles, no caption): width ``PAD + cols * (W*scale + PAD)``; the
    cells of the last row end ``PAD`` pixels above the bottom edge.
    """
    from PIL import Image, ImageDraw, ImageFont

    images = [np.asarray(im) for im in images]
    n_rows, n_cols = len(images), len(heatmaps_by_column) + 1
    if n_rows == 0:
        raise ValueError("save_grid needs at least one image")
    if len(column_titles) != n_cols:
        raise ValueError(f"got {len(column_titles)} column titles for {n_cols} columns (input + {n_cols - 1} maps)")
    if row_titles is not None and len(row_titles) != n_rows:
        raise ValueError(f"got {len(row_titles)} row titles for {n_rows} rows")
    if outlines is not None and len(outlines) != n_rows:
        raise ValueError(f"got {len(outlines)} outlines for {n_rows} rows")
    for j, col in enumerate(heatmaps_by_column):
        if len(col) != n_rows:
            raise ValueError(f"column {column_titles[j + 1]!r} has {len(col)} maps for {n_rows} images")
    h, w = images[0].shape[:2]
    cw, ch = w * scale, h * scale

    font = ImageFont.load_default(size=FONT_SIZE)
    draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(s: str) -> int:
        return int(np.ceil(draw0.textlength(s, font=font)))

    line_h = font.getbbox("Ag")[3] + LINE_SPACING
    wrapped = [_wrap(str(t), cw, text_w) for t in column_titles]
    title_h = max(len(lines) for lines in wrapped) * line_h + PAD
    left = (max(text_w(str(t)) for t in row_titles) + 2 * PAD) if row_titles else 0
    width = PAD + left + n_cols * (cw + PAD)
    caption_lines = _wrap(caption, width - 2 * PAD, text_w) if caption else []
    cap_h = len(caption_lines) * line_h + (PAD if caption else 0)
    height = PAD + title_h + n_rows * (ch + PAD) + cap_h

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(wrapped):
        x0 = PAD + left + j * (cw + PAD)
        y = PAD + title_h - PAD - len(lines) * line_h        # bottom-align titles
        for line in lines:
            draw.text((x0 + (cw - text_w(line)) // 2, y), line, fill=TEXT, font=font)
            y += line_h
    for i, im in enumerate(images):
        if im.shape[:2] != (h, w):
            raise ValueError(f"image {i} is {im.shape[:2]}, expected {(h, w)} like the first")
        y0 = PAD + title_h + i * (ch + PAD)
        cells = [im.astype(np.uint8)] + [to_rgb(col[i]) for col in heatmaps_by_column]
        edge = None
        if outlines is not None:
            m = _as_numpy(outlines[i]).astype(bool)
            if m.shape != (h, w):
                raise ValueError(f"outline of row {i} is {m.shape}, expected {(h, w)}")
            edge = outline(m.repeat(scale, 0).repeat(scale, 1))
        for j, cell in enumerate(cells):
            if cell.shape[:2] != (h, w):
                raise ValueError(f"map for row {i}, column {column_titles[j]!r} is {cell.shape[:2]}, expected {(h, w)}")
            cell = np.ascontiguousarray(cell[..., :3].repeat(scale, 0).repeat(scale, 1))
            if edge is not None:
                cell[edge] = OUTLINE
            canvas.paste(Image.fromarray(cell, "RGB"), (PAD + left + j * (cw + PAD), y0))
        if row_titles:
            draw.text((PAD, y0 + (ch - line_h) // 2), str(row_titles[i]), fill=TEXT, font=font)
    for k, line in enumerate(caption_lines):
        draw.text((PAD, height - cap_h + k * line_h), line, fill=TEXT, font=font)

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
    return width, height


def outline(mask: np.ndarray) -> np.ndarray:
    """The outline of a 2-D bool mask: its pixels with a 4-neighbour outside the mask (the
    image border counts as outside)."""
    m = np.pad(mask.astype(bool), 1, constant_values=False)
    interior = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~interior


def _as_numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def _wrap(title: str, width: int, text_w) -> list[str]:
    """Split ``title`` into lines no wider than ``width``, breaking after hyphens/spaces
    (a single word wider than ``width`` stays on its own line)."""
    pieces, cur = [], ""
    for ch in title:
        cur += ch
        if ch in "- ":
            pieces.append(cur)
            cur = ""
    if cur:
        pieces.append(cur)
    lines, line = [], ""
    for p in pieces:
        if line and text_w((line + p).rstrip()) > width:
            lines.append(line.rstrip())
            line = p
        else:
            line += p
    lines.append(line.rstrip())
    return lines
