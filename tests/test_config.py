"""Config presets load and validate; bad files fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from xattn.app.config import ConfigError, load_config, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ["shapes-world.yaml", "shapes-world-dit.yaml", "sd15.yaml", "sd21.yaml", "sdxl.yaml", "sd35-medium.yaml",
           "flux-schnell.yaml", "flux-dev.yaml"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    config = load_config(CONFIGS / name)
    # what a preset is for: resolution, steps, guidance and the sites to aggregate
    assert {"size", "steps", "guidance", "sites"} <= set(config)
    width, height = (int(n) for n in config["size"].split("x"))
    assert width == height and width % 64 == 0
    assert config["sites"].startswith("kind=cross")


def test_preset_sizes_match_the_models():
    sizes = {name: load_config(CONFIGS / name)["size"] for name in PRESETS}
    assert sizes == {"shapes-world.yaml": "64x64", "shapes-world-dit.yaml": "64x64", "sd15.yaml": "512x512",
                     "sd21.yaml": "768x768", "sdxl.yaml": "1024x1024", "sd35-medium.yaml": "1024x1024",
                     "flux-schnell.yaml": "1024x1024", "flux-dev.yaml": "1024x1024"}


def test_the_transformer_presets_keep_their_models_schedulers_and_guidance():
    """Flow-matching models keep their own sampler; schnell runs unguided, dev's guidance is its embedded one."""
    presets = {name: load_config(CONFIGS / name) for name in PRESETS}
    for name in ("sd35-medium.yaml", "flux-schnell.yaml", "flux-dev.yaml", "shapes-world-dit.yaml"):
        assert "scheduler" not in presets[name]
    assert presets["flux-schnell.yaml"]["steps"] == 4 and presets["flux-schnell.yaml"]["guidance"] == 0.0
    assert presets["shapes-world-dit.yaml"]["model"] == "dit"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key", [
    ("stpes: 3\n", "stpes"),
    ("steps: -1\n", "steps"),
    ("steps: three\n", "steps"),
    ("guidance: [1]\n", "guidance"),
    ("size: 65\n", "size"),
    ("scheduler: dpm9\n", "scheduler"),
    ("device: gpu\n", "device"),
    ("dtype: float8\n", "dtype"),
    ('sites: "kind=bogus"\n', "sites"),
    ('sites: "res=abc"\n', "sites"),
    ("seed: true\n", "seed"),
])
def test_bad_key_or_value_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=rf"c\.yaml: (unknown )?key '{key}'"):
        load_config(write(tmp_path, text))


def test_unknown_key_lists_known_keys(tmp_path):
    with pytest.raises(ConfigError, match="known keys are:.*steps"):
        load_config(write(tmp_path, "stpes: 3\n"))


def test_not_yaml_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "steps: [1\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_extra_keys_of_a_command(tmp_path):
    def words(value):
        if not isinstance(value, str):
            raise ValueError("a comma list of words")
        return value

    assert load_config(write(tmp_path, "words: red,blue\n"), extra_keys={"words": words}) == {"words": "red,blue"}
    with pytest.raises(ConfigError, match="key 'words' must be a comma list of words"):
        load_config(write(tmp_path, "words: 3\n"), extra_keys={"words": words})


def test_values_are_cleaned():
    assert validate({"size": 64, "steps": 3, "guidance": 7}) == {"size": "64x64", "steps": 3, "guidance": 7.0}


# -- guide: attention guidance ------------------------------------------------------------------

def _record(guide):
    import json

    return json.loads(json.dumps(guide.to_dict()))


def test_guide_is_kept_as_the_record_of_the_guide_the_command_line_builds():
    from xattn.app.config import guide_from_config
    from xattn.guide import guide_from_text

    typed = _record(guide_from_text(excite="circle,square", bind="red=circle,blue=square",
                                    boxes=["red circle=0,0,0.5,1", "blue square=0.5,0,1,1"], steps="0:10",
                                    step_size=5.0, refine="0:0.9,5:0.5"))
    mappings = {"excite": ["circle", "square"], "bind": {"red": "circle", "blue": "square"},
                "box": {"red circle": [0, 0, 0.5, 1], "blue square": [0.5, 0, 1, 1]}, "steps": "0:10", "step_size": 5,
                "refine": {0: 0.9, 5: 0.5}}
    texts = {"excite": "circle,square", "bind": "red=circle,blue=square",
             "box": ["red circle=0,0,0.5,1", "blue square=0.5,0,1,1"], "steps": "0:10", "step_size": 5.0,
             "refine": "0:0.9,5:0.5"}
    for spelled in (mappings, texts, dict(reversed(list(mappings.items())))):  # key order does not matter
        cleaned = validate({"guide": spelled})["guide"]
        assert cleaned == typed
        assert _record(guide_from_config(cleaned)) == typed
    # the default window is the command line's (the first half), and a fraction reads as --guide-steps reads it
    assert validate({"guide": {"excite": "circle"}})["guide"] == _record(guide_from_text(excite="circle"))
    assert validate({"guide": {"excite": "circle", "steps": 0.25}})["guide"]["steps"] == \
        _record(guide_from_text(excite="circle", steps="0.25"))["steps"]
    assert validate({"guide": None}) == validate({"guide": {}}) == {"guide": None}
    assert guide_from_config(None) is None


@pytest.mark.parametrize("text, key, message", [
    ("guide: {exite: circle}\n", "guide.exite", "guide keys are"),
    ("guide: {excite: circle, step_size: .nan}\n", "guide.step_size", "must be a finite number, not nan"),
    ("guide: {excite: circle, step_size: 1e39}\n", "guide.step_size", "out of float32 range"),
    ("guide: {excite: circle, step_size: -1}\n", "guide.step_size", "positive"),
    ("guide: {excite: circle, step_size: true}\n", "guide.step_size", "must be a number"),
    ("guide: {excite: circle, steps: 2:10}\n", "guide.steps", "quoted"),
    ("guide: {excite: circle, steps: 1.5}\n", "guide.steps", "fraction"),
    ("guide: {box: {red circle: [0, 0, .inf, 1]}}\n", "guide.box", "must be a finite number, not inf"),
    ("guide: {box: {red circle: [0.5, 0, 0.5, 1]}}\n", "guide.box", "x0 < x1"),
    ("guide: {box: [red circle]}\n", "guide.box", "phrase=x0,y0,x1,y1"),
    ("guide: {bind: {red: [circle]}}\n", "guide.bind", "modifier: noun"),
    ("guide: {excite: [circle, 3]}\n", "guide.excite", "a list of words"),
    ("guide: {step_size: 5}\n", "guide.step_size", "needs a loss"),
    ("guide: {refine: {0: 0.5}}\n", "guide.refine", "needs a loss"),
    ("guide: {excite: circle, refine: [0.5]}\n", "guide.refine", "a mapping of step: target loss"),
    ("guide: {excite: circle, refine: {0: .nan}}\n", "guide.refine", "must be a finite number, not nan"),
    ("guide: {excite: circle, refine: \"x:1\"}\n", "guide.refine", "STEP:TARGET"),
    ("guide: {excite: circle, refine: {0: -1}}\n", "guide.refine", "the smallest loss Excite can reach"),
    ("guide: [excite]\n", "guide", "must be a mapping"),
])
def test_bad_guide_values_name_the_key(tmp_path, text, key, message):
    with pytest.raises(ConfigError, match=rf"c\.yaml: (unknown )?key '{key}'") as error:
        load_config(write(tmp_path, text))
    assert message in str(error.value)


def test_guidance_options_spelled_at_the_top_level_point_to_guide():
    with pytest.raises(ConfigError, match=r"unknown key 'guide_steps' \(guidance goes under guide:, as guide: \{steps"):
        validate({"guide_steps": "0:10"})
