"""Step windows of an edit resolve to the step indices prompt-to-prompt means."""

from __future__ import annotations

import pytest

from xattn.edit import EditError
from xattn.edit.windows import DEFAULT_KEY, parse_window, parse_word_windows, steps_in


@pytest.mark.parametrize("spec, num_steps, expected", [
    (0.8, 10, set(range(8))),  # prompt-to-prompt's cross_replace_steps=0.8: the first 80% of steps
    ("0.8", 10, set(range(8))),
    ("0:0.8", 25, set(range(20))),
    ((0.2, 0.5), 10, {2, 3, 4}),
    ("2:5", 10, {2, 3, 4}),
    ("3", 10, {3}),
    ("0:1.0", 4, {0, 1, 2, 3}),  # a fractional window ending at 1 includes the last step
    (None, 10, set()),
    (0, 10, set()),
])
def test_windows_resolve_to_steps(spec, num_steps, expected):
    assert steps_in(parse_window(spec, what="test"), num_steps, "test") == expected


def test_per_word_windows_keep_a_default():
    windows = parse_word_windows({"circle": "0:0.4"}, what="cross_steps")
    assert set(windows) == {DEFAULT_KEY, "circle"} and windows[DEFAULT_KEY] == ()
    assert steps_in(windows["circle"], 10, "x") == {0, 1, 2, 3}


def test_fractional_window_without_a_step_count_is_refused():
    with pytest.raises(EditError, match="needs the number of steps"):
        steps_in(parse_window("0:0.5", what="x"), None, "x")
    assert steps_in(parse_window("1:3", what="x"), None, "x") == {1, 2}
