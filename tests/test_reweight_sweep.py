"""Sweep helpers: seed and weight lists, batching of consecutive seeds, the sheet's layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xattn.grid import EMPTY_CELL
from xattn.reweight import ReweightError
from xattn.app.reweight_sweep import Cell, _runs_of_consecutive, parse_seeds, parse_weights, sweep_sheet


@pytest.mark.parametrize(("text", "seeds"), [("0:4", [0, 1, 2, 3]), ("3,7", [3, 7]), ("5", [5]), (" 2:3 ", [2])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["4:2", "a:3", "-1", "1,,2", "0:4:2", ""])
def test_parse_seeds_refuses(text):
    with pytest.raises(ReweightError, match="seeds"):
        parse_seeds(text)


def test_parse_weights():
    assert parse_weights("-1,0,0.5, 1,2,4") == [-1.0, 0.0, 0.5, 1.0, 2.0, 4.0]
    with pytest.raises(ReweightError, match="number, not 'two'"):
        parse_weights("1,two")
    with pytest.raises(ReweightError, match="finite number, not 'inf'"):
        parse_weights("1,inf")
    with pytest.raises(ReweightError, match="float32"):
        parse_weights("1,1e39")  # finite in Python, infinite in float32


def test_consecutive_seeds_are_batched():
    assert _runs_of_consecutive([0, 1, 2, 7, 8, 4]) == [(0, 3), (7, 2), (4, 1)]


def test_sheet_rows_are_weights_and_columns_mode_by_seed():
    colours = {("scale", 0.0, 0): (255, 0, 0), ("scale", 0.0, 1): (0, 255, 0),
               ("bias", 0.0, 0): None, ("bias", 0.0, 1): None,
               ("scale", 1.0, 0): (0, 0, 255), ("scale", 1.0, 1): (255, 255, 0),
               ("bias", 1.0, 0): (0, 255, 255), ("bias", 1.0, 1): (255, 0, 255)}
    cells = [Cell(mode, weight, seed, None if colour is None else Image.new("RGB", (32, 32), colour),
                  skipped=None if colour else "bias needs w > 0")
             for (mode, weight, seed), colour in colours.items()]
    sheet = np.asarray(sweep_sheet(cells, min_cell=64))

    def top_left(colour):
        ys, xs = np.nonzero(np.all(sheet == np.array(colour, dtype=np.uint8), axis=-1))
        return ys.min(), xs.min(), ys.max() - ys.min() + 1

    # row of w=0 above row of w=1; columns scale s0, scale s1, bias s0, bias s1 from left to right
    red, green, blue = top_left((255, 0, 0)), top_left((0, 255, 0)), top_left((0, 0, 255))
    cyan, magenta = top_left((0, 255, 255)), top_left((255, 0, 255))
    assert red[2] == 64  # 32 px upscaled to the 64 px minimum
    assert red[0] == green[0] < blue[0] == cyan[0] == magenta[0]
    assert red[1] == blue[1] < green[1] < cyan[1] < magenta[1]
    grey = np.all(sheet == np.array(EMPTY_CELL, dtype=np.uint8), axis=-1)
    for column in (cyan[1], magenta[1]):  # the two skipped bias cells, in the w=0 row
        assert grey[red[0]:red[0] + 64, column:column + 64].all()
