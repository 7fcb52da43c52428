"""The procedural world: masks match pixels, captions match objects, splits hold."""
import numpy as np
import pytest

from xattn.world import (ALL_COMBOS, COLORS, HELD_OUT, SHAPES, TRAIN_COMBOS, classify_shape,
                         heldout_prompts, heldout_scenes, make_scene, object_words, segment)
from xattn.world.data import grounding_targets, mask_fraction, object_slots

import torch

torch.set_num_threads(1)


def test_palette_and_split():
    assert {"red", "green", "blue", "yellow"} <= set(COLORS)
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert HELD_OUT and HELD_OUT < set(ALL_COMBOS)
    assert not HELD_OUT & set(TRAIN_COMBOS)
    # every colour and shape is still seen in training with some partner
    assert {c for c, _ in TRAIN_COMBOS} == set(COLORS)
    assert {s for _, s in TRAIN_COMBOS} == set(SHAPES)


def test_same_seed_same_scene():
    a, b = make_scene(123), make_scene(123)
    assert a.caption == b.caption
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(make_scene(124).image, a.image) or make_scene(124).caption != a.caption


@pytest.mark.parametrize("seed", range(60))
def test_masks_match_image(seed):
    scene = make_scene(seed)
    assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
    union = np.zeros((64, 64), bool)
    for obj in scene.objects:
        assert obj.mask.dtype == bool and obj.mask.sum() > 50
        assert (scene.image[obj.mask] == COLORS[obj.color]).all()
        assert not (union & obj.mask).any(), "objects overlap"
        union |= obj.mask
    assert (scene.image[~union] == 255).all(), "background must be white"


def test_captions_name_the_objects():
    for seed in range(200):
        scene = make_scene(seed)
        named = object_words(scene.caption)
        assert sorted(named) == sorted((o.color, o.shape) for o in scene.objects)
        if len(scene.objects) == 2:
            assert scene.caption == " and ".join(f"a {c} {s}" for c, s in named)
            assert scene.objects[0].color != scene.objects[1].color
        else:
            assert scene.caption == "a {} {}".format(*named[0])


def test_mention_order_is_random():
    orders = {tuple(make_scene(s, n_objects=2).mention_order) for s in range(40)}
    assert orders == {(0, 1), (1, 0)}


def test_word_masks_and_token_slots():
    from xattn.world.export import load_tokenizer
    tok = load_tokenizer()
    for seed in range(30):
        scene = make_scene(seed, n_objects=2)
        ids = tok(scene.caption).input_ids
        slots = object_slots(scene)
        for (i, word, mask), slot in zip(scene.word_masks(), [s for o in scene.mention_order for s in slots[o]]):
            assert slot == i + 1
            assert tok.convert_ids_to_tokens(ids[slot]) == word + "</w>"
            owner = [o for o in scene.objects if o.mask is mask][0]
            assert word in (owner.color, owner.shape)


def test_held_out_never_in_training():
    for seed in range(3000):
        scene = make_scene(seed, split="train")
        assert not {(o.color, o.shape) for o in scene.objects} & HELD_OUT
        for combo in HELD_OUT:
            assert " ".join(combo) not in scene.caption


def test_heldout_eval_set_is_fixed_and_held_out():
    singles, pairs = heldout_prompts()
    assert (singles, pairs) == heldout_prompts()
    for cap in singles + pairs:
        assert set(object_words(cap)) & HELD_OUT
    scenes = heldout_scenes(5)
    assert [s.caption for s in scenes] == [s.caption for s in heldout_scenes(5)]
    assert all(len(s.objects) == 2 for s in scenes)


def test_segmenter_and_shape_classifier_on_ground_truth():
    for seed in range(150):
        scene = make_scene(seed, split="any")
        for obj in scene.objects:
            m = segment(scene.image, obj.color)
            assert np.array_equal(m, obj.mask)
            assert classify_shape(m) == obj.shape


def test_grounding_targets_put_masks_on_slots():
    scene = make_scene(7, n_objects=2)
    masks = torch.tensor(np.stack([mask_fraction(o.mask, 16) for o in scene.objects]))[None]
    slots = torch.tensor(object_slots(scene))[None]
    targets, valid = grounding_targets(masks, slots)
    assert valid.sum() == 4
    for k, (cs, ss) in enumerate(object_slots(scene)):
        assert torch.allclose(targets[256][0, cs].reshape(16, 16), masks[0, k])
        assert torch.allclose(targets[64][0, ss].sum(), masks[0, k].sum() / 4)


def test_drawn_as_named_accepts_ground_truth_and_refuses_swapped_shapes():
    from xattn.world.measure import drawn_as_named

    checked = 0
    for seed in range(40):
        scene = make_scene(seed, n_objects=2)
        (c1, s1), (c2, s2) = object_words(scene.caption)
        assert drawn_as_named(scene.image, scene.caption), scene.caption
        if s1 != s2:
            assert not drawn_as_named(scene.image, f"a {c1} {s2} and a {c2} {s1}")
            checked += 1
        assert not drawn_as_named(scene.image, f"a {c1} {s1}")  # two objects drawn, one named
    assert checked >= 10
