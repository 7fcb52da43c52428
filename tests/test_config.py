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
