"""``<lora:name:weight>`` tags with ``--lora-dir``: loaded as A1111 loads them, or removed with a warning.

Reference: the same LoRA file loaded by hand with diffusers (``load_lora_weights``
+ ``set_adapters`` at the tag's weight) and the prompt without its tag.
"""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import tiny_models
from xattn.app import runner
from xattn.prompts.networks import network_tags
from xattn.prompts.types import PromptSyntaxError

CALL = ("--steps", 2, "--size", 32, "--seed", 3, "--no-progress")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, sd1_path):
    folder = tmp_path_factory.mktemp("loras")
    shutil.move(tiny_models.save_unet_lora(tiny_models.load_sd(sd1_path), folder), folder / "style.safetensors")
    return folder


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def reference(sd1_path, lora_dir, weight):
    pipe = runner.load_pipeline(str(sd1_path), device="cpu")
    if weight is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name="style.safetensors", adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[weight])
    return np.asarray(runner.generate(pipe, "a red circle", seed=3, steps=2, guidance=5.0, size=32)[0])


def test_tags_are_read_as_a1111_writes_them():
    tags = network_tags("a cat <lora:style:0.7> and <lora:other> <hypernet:h:0.5>")
    assert [(t.kind, t.name, t.weight) for t in tags] == [("lora", "style", 0.7), ("lora", "other", 1.0),
                                                          ("hypernet", "h", 0.5)]
    with pytest.raises(PromptSyntaxError, match="finite"):
        network_tags("a <lora:style:nan>")


def test_lora_dir_loads_the_tag_at_its_weight(cli, tmp_path, sd1_path, lora_dir):
    result = cli("generate", "a red circle <lora:style:0.7>", "--model", sd1_path, "--lora-dir", lora_dir,
                 "--out", "a", *CALL)
    assert result.exit_code == 0, result.output
    image = pixels(tmp_path / "a" / "image-0.png")
    assert np.array_equal(image, reference(sd1_path, lora_dir, 0.7))
    assert not np.array_equal(image, reference(sd1_path, lora_dir, None))  # the LoRA changed the image
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["loras"] == [{"name": "style", "weight": 0.7, "file": str(lora_dir / "style.safetensors")}]


def test_without_lora_dir_the_tag_is_removed_with_a_warning(cli, tmp_path, sd1_path, lora_dir):
    with pytest.warns(UserWarning, match="--lora-dir"):
        result = cli("generate", "a red circle <lora:style:0.7>", "--model", sd1_path, "--out", "b", *CALL)
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "b" / "image-0.png"), reference(sd1_path, lora_dir, None))


@pytest.mark.parametrize("prompt, message", [
    ("a red circle <lora:missing:0.5>", "missing.safetensors"),
    ("a red circle <hypernet:h:0.5>", "extra network"),
])
def test_bad_tags_exit_2(cli, sd1_path, lora_dir, prompt, message):
    result = cli("generate", prompt, "--model", sd1_path, "--lora-dir", lora_dir, *CALL)
    assert result.exit_code == 2 and message in result.output, result.output
