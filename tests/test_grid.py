"""labelled_grid: cells land in row/column order at their size, labels take room and show ink."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xattn.grid import EMPTY_CELL, labelled_grid

COLOURS = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]


def _solid(colour, size=(20, 16)):
    return Image.new("RGB", size, colour)


def _box_of(sheet: Image.Image, colour) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the pixels exactly equal to ``colour``."""
    pixels = np.asarray(sheet)
    ys, xs = np.nonzero(np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1))
    assert len(xs), f"{colour} is not in the sheet"
    return xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def _has_ink(region: Image.Image) -> bool:
    return bool((np.asarray(region.convert("L")) < 128).any())


def test_cells_are_placed_in_order_at_their_size():
    sheet = labelled_grid([[_solid(c) for c in row] for row in COLOURS], cell_scale=2, gap=3)
    boxes = [[_box_of(sheet, c) for c in row] for row in COLOURS]
    for r, row in enumerate(boxes):
        for c, (left, top, width, height) in enumerate(row):
            assert (width, height) == (40, 32)  # upscaled 2x, nearest neighbour keeps it solid
            if c:
                assert left == row[c - 1][0] + 40 + 3 and top == row[c - 1][1]
            if r:
                assert top == boxes[r - 1][c][1] + 32 + 3 and left == boxes[r - 1][c][0]
    assert sheet.mode == "RGB"
    non_white = np.any(np.asarray(sheet) != 255, axis=-1).sum()
    assert non_white == 6 * 40 * 32  # no labels, no title: nothing but the cells on white


def test_labels_and_title_take_room_and_are_drawn():
    cells = [[_solid(c) for c in row] for row in COLOURS]
    plain = labelled_grid(cells)
    sheet = labelled_grid(cells, row_labels=["w=0", "w=2"], col_labels=["seed 0", "seed 1", "seed 2"],
                          title="red, scale mode")
    assert sheet.width > plain.width and sheet.height > plain.height
    left, top, _, _ = _box_of(sheet, COLOURS[0][0])
    assert _has_ink(sheet.crop((0, top, left, sheet.height)))  # row labels, left of the cells
    assert _has_ink(sheet.crop((left, 0, sheet.width, top)))  # title and column labels, above


def test_wide_column_labels_widen_the_columns():
    sheet = labelled_grid([[_solid((255, 0, 0)), _solid((0, 255, 0))]], col_labels=["a very long column label", "b"])
    first, second = _box_of(sheet, (255, 0, 0)), _box_of(sheet, (0, 255, 0))
    assert second[0] - first[0] > 20 + 4


def test_none_cells_are_grey_placeholders():
    sheet = labelled_grid([[_solid((255, 0, 0)), None]])
    assert _box_of(sheet, EMPTY_CELL)[2:] == (20, 16)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(images=[]), "at least one row"),
    (dict(images=[[None]]), "at least one image"),
    (dict(images=[[_solid((0, 0, 0))], [_solid((0, 0, 0)), _solid((0, 0, 0))]]), "row 1 has 2 images"),
    (dict(images=[[_solid((0, 0, 0)), _solid((0, 0, 0), (8, 8))]]), "row 0, column 1 is 8x8"),
    (dict(images=[[_solid((0, 0, 0))]], row_labels=["a", "b"]), "row_labels has 2 labels for 1 rows"),
    (dict(images=[[_solid((0, 0, 0))]], col_labels="ab"), "list of strings"),
    (dict(images=[[_solid((0, 0, 0))]], cell_scale=0), "cell_scale"),
])
def test_bad_input_is_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        labelled_grid(**kwargs)
