"""Labelled image grids (contact sheets) for sweeps and comparisons.

One function, :func:`labelled_grid`: a table of equally sized images with a
label per row on the left, a label per column on top, and an optional title.
Reweight sweeps, capture sheets and edit sheets all use it, so a figure reads
the same everywhere. Pure PIL; the font is Pillow's bundled default.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
EMPTY_CELL = (225, 225, 225)  # a cell given as None: nothing to show there (e.g. a weight a mode rejects)


def labelled_grid(images: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str] | None = None,
                  col_labels: Sequence[str] | None = None, title: str | None = None, *,
                  cell_scale: int = 1, gap: int = 4, font_size: int = 12) -> Image.Image:
    """Arrange ``images`` in rows and columns, with labels, as one RGB image.

    Args:
        images: rows of cells; every row has the same number of cells and every
            image the same size. A ``None`` cell is drawn as a plain grey square.
        row_labels: one label per row, drawn left of the row (``None``: no labels).
        col_labels: one label per column, drawn above it (``None``: no labels).
        title: a line of text above everything (``None``: no title).
        cell_scale: whole-number upscaling of each image (nearest neighbour, so
            a 64 x 64 image stays crisp at 3x).
        gap: pixels between cells and around the sheet.
        font_size: label text size in pixels.

    Returns:
        A new ``PIL.Image`` in RGB mode.

    Raises:
        ValueError: empty input, rows of different lengths, images of different
            sizes, or label counts that do not match the rows or columns.
    """
    cells, (cell_w, cell_h) = _checked_cells(images, cell_scale)
    n_rows, n_cols = len(cells), len(cells[0])
    _check_labels(row_labels, n_rows, "row_labels", "rows")
    _check_labels(col_labels, n_cols, "col_labels", "columns")

    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size_of(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label_w = max((size_of(t)[0] for t in row_labels), default=0) + gap if row_labels else 0
    col_w = max([cell_w] + ([size_of(t)[0] for t in col_labels] if col_labels else []))
    header_h = max(size_of(t)[1] for t in col_labels) + gap if col_labels else 0
    title_h = size_of(title)[1] + 2 * gap if title else 0

    width = gap + label_w + n_cols * (col_w + gap)
    height = gap + title_h + header_h + n_rows * (cell_h + gap)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    if title:
        draw.text((gap, gap), title, fill=INK, font=font)
    top = gap + title_h
    left = gap + label_w
    for c, label in enumerate(col_labels or []):
        text_w, _ = size_of(label)
        draw.text((left + c * (col_w + gap) + (col_w - text_w) // 2, top), label, fill=INK, font=font)
    top += header_h
    for r, row in enumerate(cells):
        y = top + r * (cell_h + gap)
        if row_labels:
            text_h = size_of(row_labels[r])[1]
            draw.text((gap, y + (cell_h - text_h) // 2), row_labels[r], fill=INK, font=font)
        for c, cell in enumerate(row):
            x = left + c * (col_w + gap) + (col_w - cell_w) // 2
            if cell is None:
                draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=EMPTY_CELL)
            else:
                sheet.paste(cell, (x, y))
    return sheet


def _checked_cells(images, cell_scale: int) -> tuple[list[list[Image.Image | None]], tuple[int, int]]:
    """Rows of RGB cells, upscaled, and the common cell size; clear errors otherwise."""
    if isinstance(cell_scale, bool) or not isinstance(cell_scale, int) or cell_scale < 1:
        raise ValueError(f"cell_scale must be a whole number >= 1, not {cell_scale!r}")
    rows = [list(row) for row in images]
    if not rows or not rows[0]:
        raise ValueError("labelled_grid needs at least one row with at least one image")
    for r, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ValueError(f"row {r} has {len(row)} images, row 0 has {len(rows[0])}: rows must be equally long")
    sizes = {(r, c): cell.size for r, row in enumerate(rows) for c, cell in enumerate(row) if cell is not None}
    if not sizes:
        raise ValueError("labelled_grid needs at least one image (every cell is None)")
    first, size = next(iter(sizes.items()))
    for where, other in sizes.items():
        if other != size:
            raise ValueError(f"image at row {where[0]}, column {where[1]} is {other[0]}x{other[1]}, "
                             f"the image at row {first[0]}, column {first[1]} is {size[0]}x{size[1]}: sizes must match")
    scaled = (size[0] * cell_scale, size[1] * cell_scale)

    def prepared(cell):
        if cell is None:
            return None
        cell = cell.convert("RGB")
        return cell.resize(scaled, Image.Resampling.NEAREST) if cell_scale != 1 else cell

    return [[prepared(cell) for cell in row] for row in rows], scaled


def _check_labels(labels, count: int, name: str, what: str) -> None:
    if labels is None:
        return
    if isinstance(labels, str):
        raise ValueError(f"{name} must be a list of strings, not one string")
    if len(labels) != count:
        raise ValueError(f"{name} has {len(labels)} labels for {count} {what}")


__all__ = ["labelled_grid"]
