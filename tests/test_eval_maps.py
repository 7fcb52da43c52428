"""Map-vs-mask scores: IoU, threshold sweeps, own-vs-other mass -- checked against hand-counted pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xattn import eval as scoring


def test_iou_counts_pixels():
    heat = np.array([[0.9, 0.8, 0.1], [0.2, 0.7, 0.0]])
    mask = np.array([[True, False, False], [False, True, True]])
    # heat >= 0.5 picks (0,0), (0,1), (1,1); mask holds (0,0), (1,1), (1,2): 2 shared of 4 in the union
    assert scoring.iou(heat, mask, 0.5) == pytest.approx(2 / 4)
    assert scoring.iou(heat, mask, 0.85) == pytest.approx(1 / 3)  # only (0,0) picked
    assert scoring.iou(np.zeros((2, 2)), np.zeros((2, 2), bool), 0.5) == 0.0
    assert scoring.iou(torch.tensor(heat), mask, 0.5) == pytest.approx(0.5)  # tensors work too


def test_sweep_and_summary_find_the_best_threshold():
    heat = np.linspace(0, 1, 10).reshape(1, 10)
    mask = heat >= 0.6  # the best threshold lies between 0.56 and 0.66
    ious = scoring.iou_sweep(heat, mask, thresholds=(0.3, 0.6, 0.9))
    assert list(ious) == pytest.approx([4 / 7, 1.0, 1 / 4])
    score = scoring.score_word(heat, heat, mask, ~mask, thresholds=(0.3, 0.6, 0.9))
    summary = scoring.summarize([score], thresholds=(0.3, 0.6, 0.9))
    assert summary.best_threshold == 0.6 and summary.best_iou == 1.0
    assert summary.win_rate == 1.0  # 0.67+0.78+0.89+1.0 inside vs 0+...+0.56 outside
    assert "best IoU" in scoring.format_table([summary])


def test_win_needs_more_mass_on_its_own_object():
    heat = np.array([[1.0, 1.0, 3.0]])
    own, other = np.array([[True, True, False]]), np.array([[False, False, True]])
    assert scoring.score_word(heat, heat, own, other).wins is False  # 2 < 3
    assert scoring.score_word(heat, heat, other, own).wins is True
    assert scoring.score_word(heat, heat, own).wins is None  # one object: no contest
    summary = scoring.summarize([scoring.score_word(heat, heat, own, other), scoring.score_word(heat, heat, own)])
    assert summary.win_rate == 0.0 and summary.contests == 1 and summary.words == 2


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"differ in size.*size=mask.shape"):
        scoring.iou(np.zeros((4, 4)), np.zeros((8, 8), bool), 0.5)
    with pytest.raises(ValueError, match="no word scores"):
        scoring.summarize([], "colour")


def test_object_words_reads_world_captions():
    assert scoring.object_words("a red circle and a blue square") == [("red", "circle"), ("blue", "square")]
    assert scoring.object_words("a green triangle") == [("green", "triangle")]


def _maps_from_masks(scenes, swap: bool):
    """Word maps that are exactly each word's object mask (or the other object's, when swapped)."""
    import tiny_models
    from xattn.capture import MapLayer, WordMaps
    from xattn.hookpoints import Row
    from xattn.tokens import TokenMap

    side = scenes[0].image.shape[0]
    data = torch.zeros(len(scenes), 1, side * side, 77)  # [rows, heads, i, j]
    token_maps = []
    for row, scene in enumerate(scenes):
        token_map = TokenMap(tiny_models.tokenizer(), scene.caption)
        token_maps.append(token_map)
        order = scene.mention_order[::-1] if swap else scene.mention_order
        seen: dict[str, int] = {}
        for mention, (colour, shape) in enumerate(scoring.object_words(scene.caption)):
            mask = torch.from_numpy(scene.objects[order[mention]].mask).float().flatten()
            for word in (colour, shape):
                seen[word] = seen.get(word, 0) + 1  # "a red circle and a blue circle": two circles
                data[row, 0, :, token_map.indices(f"{word}#{seen[word]}")] = mask[:, None]
    layer = MapLayer("cross", (side, side), (0,), ("site",), 1, None, data=data)
    rows = tuple(Row(True, p, 0) for p in range(len(scenes)))
    return WordMaps([layer], rows=rows, columns=None, prompts=[s.caption for s in scenes],
                    token_maps=token_maps, image_size=(side, side))


def test_world_scoring_finds_objects_by_colour():
    from xattn.world import heldout_scenes

    scenes = heldout_scenes(4, n_objects=2)
    images = [scene.image for scene in scenes]
    perfect = scoring.score_world_images(_maps_from_masks(scenes, swap=False), images)
    assert len(perfect.scores) == 4 * 4 and not perfect.skipped
    colour, shape, overall = perfect.summaries()
    assert overall.win_rate == 1.0 and overall.best_iou == pytest.approx(1.0)
    swapped = scoring.score_world_images(_maps_from_masks(scenes, swap=True), images)
    assert swapped.summaries()[-1].win_rate == 0.0 and swapped.summaries()[-1].best_iou == 0.0
    blank = [np.full_like(images[0], 255)] + images[1:]  # nothing drawn in the first image
    partial = scoring.score_world_images(_maps_from_masks(scenes, swap=False), blank)
    assert len(partial.skipped) == 1 and "object drawn" in partial.skipped[0][2]


def test_objects_are_the_largest_region_of_their_colour_and_must_not_touch():
    from xattn.world.scenes import COLORS

    image = np.full((20, 20, 3), 255, np.uint8)
    image[2:8, 2:8] = COLORS["red"]  # the red object
    image[15, 15] = COLORS["red"]  # a stray red pixel far away
    image[12:18, 2:8] = COLORS["blue"]
    mask = scoring.object_mask(image, "red")
    assert mask.sum() == 36 and not mask[15, 15]
    blue = scoring.object_mask(image, "blue")
    assert not scoring._touch(mask, blue)
    image[8:12, 2:8] = COLORS["blue"]  # now the blue region reaches the red one
    assert scoring._touch(mask, scoring.object_mask(image, "blue"))
