"""The shipped shapes-world transformer (``model_path("dit")``): a StableDiffusion3Pipeline without T5 that works.

Needs the committed weights in src/xattn/world/model_dit/ (a missing model is a
failure, not a skip). Its figures are in its model card (scripts/eval_world.py
--model dit, scripts/eval_concepts.py); these tests check the same claims on a
few fixed seeds and scenes, against pixels and ground-truth masks.
"""
import json

import numpy as np
import pytest
import torch

import xattn
from xattn.app.runner import load_pipeline
from xattn.world import heldout_scenes, model_path, segment
from xattn.world.data import object_slots
from xattn.world.measure import dominant_color, generate
from xattn.world.measure.model import scene_concept_maps, scene_word_maps

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dit():
    pipe = load_pipeline("dit", device="cpu", dtype="float32")
    return pipe


def test_folder_is_small_complete_and_loads_as_the_model_card_shows():
    from diffusers import StableDiffusion3Pipeline

    folder = model_path("dit")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 1024 * 1024, f"model folder is {size / 2**20:.1f} MiB"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    assert (folder / "README.md").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.dtype == torch.float32 and pipe.vae_scale_factor == 4
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == 64
    with pytest.raises(ValueError, match="unet, dit"):
        model_path("vit")


def test_draws_the_named_colours(dit):
    images = generate(dit, "a yellow circle", [0, 1, 2, 3], 4.0, 25)
    assert sum(dominant_color(image) == "yellow" for image in images) >= 3
    pair = generate(dit, "a blue triangle and a yellow circle", [0, 1], 4.0, 25)  # drawn as named in seeds 0-7
    assert all(segment(image, "blue").sum() >= 40 and segment(image, "yellow").sum() >= 40 for image in pair)


def test_word_maps_land_on_their_objects(dit):
    wins = []
    for k, scene in enumerate(heldout_scenes(6)):
        slots = object_slots(scene)
        maps = scene_word_maps(dit, scene, [s for pair in slots for s in pair], seed=k)
        for index, obj in enumerate(scene.objects):
            rival = scene.objects[1 - index]
            wins.extend(maps[slot][obj.mask].mean() > maps[slot][rival.mask].mean() for slot in slots[index])
    assert np.mean(wins) >= 0.8, wins


def test_concept_maps_of_words_not_in_the_prompt_run_on_it(dit):
    scene = heldout_scenes(1)[0]
    maps = scene_concept_maps(dit, scene, ["red", "green", "blue", "yellow", "circle", "square", "triangle"])
    stacked = np.stack(list(maps.values()))
    assert stacked.shape == (7, 64, 64) and np.isfinite(stacked).all()
    assert np.allclose(stacked.sum(0), 1.0, atol=1e-4)  # a softmax over the concepts, upsampled


def test_zeroing_a_colour_word_removes_most_of_that_colour(dit):
    """The model card's weight-0 figure on one of its captions (red is the exception it names; green is not)."""
    prompt = "a green circle and a blue square"
    plain = generate(dit, prompt, [0, 1, 2, 3], 4.0, 25)
    with xattn.hooks(dit, xattn.Reweight({"green": 0.0}, mode="scale")):
        zeroed = generate(dit, prompt, [0, 1, 2, 3], 4.0, 25)
    before = sum(int(segment(image, "green").sum()) for image in plain)
    after = sum(int(segment(image, "green").sum()) for image in zeroed)
    assert before > 200 and after <= 0.5 * before, (before, after)


@pytest.mark.parametrize("command", [
    ["maps", "a red square and a blue circle"],
    ["maps", "a red square and a blue circle", "--concepts", "red,blue,circle,square,green"],
    ["reweight", "a (red:0) square and a blue circle"],
    ["edit", "--source", "a red square and a blue circle", "--target", "a green square and a blue circle"],
])
def test_cli_commands_run_on_it(cli, tmp_path, command):
    result = cli(*command, "--model", "dit", "--seed", 1, "--out", "run", "--no-progress")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model"]["path"] == str(model_path("dit"))
    assert list((tmp_path / "run").glob("*.png"))
    if "--concepts" in command:
        assert (tmp_path / "run" / "concepts.png").is_file()
        assert manifest["maps"]["concepts"] == ["red", "blue", "circle", "square", "green"]
