"""The shipped model's edit defaults: what they resolve to, and that ``xattn edit`` with no flag runs them.

The shapes world keeps an object's mask under a colour swap only with a
tight local blend on the edited object's word (docs/editing.md); those
settings live in the model's ``xattn_defaults.json`` and ``xattn edit`` uses
them unless a flag or config value says otherwise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from xattn.cli import app
from xattn.cli.edit import EDIT_DEFAULTS, edit_options
from xattn.edit import EditError, edit, edit_seeds
from xattn.edit.defaults import edited_objects, recommended
from xattn.world import SHAPES, model_path
from xattn.world.measure import as_rgb, colour_swap, colour_swap_summary

SHAPE_WORDS = list(SHAPES)
SECTION = {"blend": "edited-object", "object_words": SHAPE_WORDS, "threshold": 0.85}
# The four colour swaps of scripts/eval_edits.py (source, target, colour before, after).
COLOUR_SWAPS = [
    ("a red circle and a blue triangle", "a yellow circle and a blue triangle", "red", "yellow"),
    ("a yellow circle and a blue triangle", "a red circle and a blue triangle", "yellow", "red"),
    ("a green square and a yellow circle", "a red square and a yellow circle", "green", "red"),
    ("a red square and a yellow circle", "a green square and a yellow circle", "red", "green"),
]
KEEP_RATE = 0.9  # the bar for edits with the model's defaults
SEEDS = list(range(8))


@pytest.fixture(scope="module")
def shipped_edit_section() -> dict:
    """The ``"edit"`` section as written in the shipped model's file."""
    return json.loads((model_path() / "xattn_defaults.json").read_text())["edit"]


def test_the_edited_object_is_the_shape_word_after_a_changed_colour():
    assert edited_objects("a red circle and a blue square", "a green circle and a blue square", SHAPE_WORDS) == ["circle"]
    assert edited_objects("a red circle and a blue square", "a red circle and a yellow square", SHAPE_WORDS) == ["square"]
    # the same shape twice: the occurrence is named, so only the edited one bounds the blend
    assert edited_objects("a red circle and a blue circle", "a red circle and a green circle", SHAPE_WORDS) == ["circle#2"]
    assert edited_objects("a red circle", "a big red circle", SHAPE_WORDS) == ["circle"]  # an added attribute


def test_no_blend_is_chosen_when_an_object_word_changes():
    assert edited_objects("a red circle and a blue square", "a red square and a blue square", SHAPE_WORDS) is None
    assert edited_objects("a red circle", "a red circle and a blue square", SHAPE_WORDS) is None
    assert edited_objects("a red circle", "a red circle", SHAPE_WORDS) is None  # nothing edited
    # one blend serves every target row: a shape swap among the targets turns it off for all
    both = recommended(SECTION, "a red circle", ["a green circle", "a red square"])
    assert "blend" not in both and both["threshold"] == 0.85


def test_the_shipped_model_recommends_the_blend_of_docs_editing(shipped_edit_section):
    settings = recommended(shipped_edit_section, "a red circle and a blue triangle", ["a yellow circle and a blue triangle"])
    assert settings == {"blend": ["circle"], "threshold": 0.85}


def test_inverted_images_take_the_shipped_inverted_settings_over_the_others(shipped_edit_section):
    source, target = COLOUR_SWAPS[0][:2]
    generated = recommended(shipped_edit_section, source, [target])
    inverted = recommended(shipped_edit_section, source, [target], inverted=True)
    assert inverted == {**generated, **shipped_edit_section["inverted"]} and inverted != generated


def test_malformed_sections_are_refused():
    with pytest.raises(EditError, match="unknown key"):
        recommended({"blend_words": ["circle"]}, "a red circle", ["a blue circle"])
    with pytest.raises(EditError, match="object_words"):
        recommended({"blend": "edited-object"}, "a red circle", ["a blue circle"])
    with pytest.raises(EditError, match="list of words"):
        recommended({"blend": "circle"}, "a red circle", ["a blue circle"])


def test_flags_beat_the_model_and_the_model_beats_the_commands_own_defaults(shipped_edit_section):
    prompts = {"source": "a red circle and a blue triangle", "target": ["a yellow circle and a blue triangle"]}
    plain = edit_options(prompts)
    assert plain["blend"] is None and plain["threshold"] == EDIT_DEFAULTS["threshold"]
    model = edit_options(prompts, shipped_edit_section)
    assert model["blend"] == ["circle"] and model["threshold"] == 0.85
    typed = edit_options({**prompts, "blend": "triangle", "threshold": 0.5}, shipped_edit_section)
    assert typed["blend"] == ["triangle"] and typed["threshold"] == 0.5
    off = edit_options({**prompts, "blend": "none"}, shipped_edit_section)
    assert off["blend"] is None


@pytest.mark.slow
def test_xattn_edit_with_default_flags_runs_the_models_local_blend(monkeypatch, tmp_path, world_pipe,
                                                                    world_settings, shipped_edit_section):
    source, target = COLOUR_SWAPS[0][:2]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["edit", "--source", source, "--target", target, "--seed", "3",
                                      "--out", "e", "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["model_edit_defaults"] == shipped_edit_section
    blends = [c for c in manifest["edit"]["controllers"] if c.get("edit") == "local_blend"]
    assert len(blends) == 1 and blends[0]["words"] == ["circle"] and blends[0]["threshold"] == 0.85
    # The images are those of the library edit with that blend, and not those without it.
    with Image.open(tmp_path / "e" / "target.png") as image:
        made = np.asarray(image.convert("RGB"))
    windows = {"cross_steps": EDIT_DEFAULTS["cross_steps"], "self_steps": EDIT_DEFAULTS["self_steps"]}
    blended = edit(world_pipe, source, target, seed=3, blend=["circle"], threshold=0.85, reprompt=False,
                   **windows, **world_settings)
    unblended = edit(world_pipe, source, target, seed=3, reprompt=False, **windows, **world_settings)
    assert np.array_equal(made, as_rgb(blended.targets[0]))
    assert not np.array_equal(made, as_rgb(unblended.targets[0]))


@pytest.mark.slow
def test_default_edits_keep_the_mask_in_nine_of_ten_colour_swaps(world_pipe, world_settings, shipped_edit_section):
    """The 64-seed figure of docs/editing.md (scripts/eval_edits.py), on fewer seeds, through the CLI's options."""
    cases = []
    for source, target, before, after in COLOUR_SWAPS:
        options = edit_options({"source": source, "target": [target]}, shipped_edit_section)
        results = edit_seeds(world_pipe, source, target, SEEDS, reprompt=False, **options, **world_settings)
        cases += [colour_swap(seed, r.source, r.targets[0], None, before, after) for seed, r in zip(SEEDS, results)]
    figures = colour_swap_summary(cases)
    print(f"\ndefault edits over {figures['cases']} colour swaps: mask kept in {figures['kept']:.0%}")
    assert figures["cases"] >= 0.75 * len(cases)
    assert figures["kept"] >= KEEP_RATE


def test_the_shipped_defaults_are_what_the_export_writes():
    """A re-export of the model (xattn.world.export) must not drop a recommended setting."""
    import json

    import xattn
    from xattn.world.export import DEFAULTS

    assert json.loads((xattn.world.model_path() / "xattn_defaults.json").read_text()) == DEFAULTS
