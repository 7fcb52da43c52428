"""Run folders (new, never overwritten, atomic writes, manifest) and A1111 PNG metadata."""

from __future__ import annotations

import json
import string
from datetime import datetime, timezone

import pytest
from hypothesis import example, given, settings, strategies as st
from PIL import Image

from xattn.app import pngmeta, runfolder

# An A1111 parameters text written by hand from the format (not by our writer).
A1111_TEXT = (
    "a (red:1.2) circle, and a blue square\n"
    "Negative prompt: blurry, low quality\n"
    'Steps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 512x768, Model: sd15, '
    'xattn: "{\\"scheduler\\": \\"euler-a\\", \\"weights\\": {\\"red\\": 2}}"'
)


def test_parse_a_hand_written_a1111_text():
    params = pngmeta.parse_parameters(A1111_TEXT)
    assert params["prompt"] == "a (red:1.2) circle, and a blue square"
    assert params["negative_prompt"] == "blurry, low quality"
    assert (params["steps"], params["sampler"], params["cfg_scale"], params["seed"]) == (25, "Euler a", 7.5, 1234)
    assert (params["width"], params["height"]) == (512, 768)
    assert params["model"] == "sd15"
    assert params["xattn"] == {"scheduler": "euler-a", "weights": {"red": 2}}


def test_written_text_has_the_a1111_shape():
    text = pngmeta.format_parameters(prompt="a red circle", negative_prompt="blur", steps=25, sampler="DDIM",
                                     cfg_scale=5, seed=3, width=64, height=64, model="shapes-world",
                                     xattn={"scheduler": "ddim"})
    lines = text.split("\n")
    assert lines[0] == "a red circle"
    assert lines[1] == "Negative prompt: blur"
    assert lines[2].startswith("Steps: 25, Sampler: DDIM, CFG scale: 5.0, Seed: 3, Size: 64x64, Model: shapes-world, xattn: ")


prompt_text = st.text(alphabet=string.ascii_letters + " ,:()[]\"'\n.!#", min_size=1, max_size=60).filter(
    lambda s: s.strip() and not s.startswith("Negative prompt: ") and "\nNegative prompt: " not in s
    and not s.split("\n")[-1].lstrip().startswith("Steps:"))


@settings(max_examples=60, deadline=None)
@given(prompt=prompt_text, negative=st.none() | prompt_text, seed=st.integers(0, 2**32 - 1),
       steps=st.integers(1, 200), cfg=st.floats(0, 30, allow_nan=False), word=prompt_text)
@example(prompt="\n:", negative=None, seed=0, steps=1, cfg=0.0, word=":")  # a prompt that starts with a newline
def test_parameters_round_trip(prompt, negative, seed, steps, cfg, word):
    own = {"weights": {word: 1.5}, "note": word}
    text = pngmeta.format_parameters(prompt=prompt, negative_prompt=negative, steps=steps, sampler="DPM++ 2M Karras",
                                     cfg_scale=cfg, seed=seed, width=64, height=96, model="m, with: comma",
                                     xattn=own)
    params = pngmeta.parse_parameters(text)
    assert params["prompt"] == prompt
    assert params["negative_prompt"] == (negative or None)
    assert (params["seed"], params["steps"], params["cfg_scale"]) == (seed, steps, float(cfg))
    assert params["sampler"] == "DPM++ 2M Karras"
    assert params["model"] == "m, with: comma"
    assert params["xattn"] == own


def test_png_chunk_round_trip(tmp_path):
    path = tmp_path / "x.png"
    runfolder.save_image_atomic(Image.new("RGB", (8, 8), "red"), path, pnginfo=pngmeta.png_info(A1111_TEXT))
    with Image.open(path) as image:
        assert image.info["parameters"] == A1111_TEXT  # the chunk A1111 tools read
    assert pngmeta.read_parameters(path)["seed"] == 1234


def test_png_without_parameters_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(pngmeta.PngMetadataError, match="plain.png.*parameters"):
        pngmeta.read_parameters(path)
    with pytest.raises(pngmeta.PngMetadataError, match="does not exist"):
        pngmeta.read_parameters(tmp_path / "missing.png")
    with pytest.raises(pngmeta.PngMetadataError, match="Steps"):
        pngmeta.parse_parameters("just a prompt")


def test_default_folders_are_new_even_in_the_same_second(tmp_path):
    first = runfolder.create_run_folder("generate", slug="A red circle!", root=tmp_path)
    second = runfolder.create_run_folder("generate", slug="A red circle!", root=tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.startswith("generate-") and first.name.endswith("-a-red-circle")
    stamp = first.name.split("-")[1]
    assert stamp == datetime.now(timezone.utc).strftime("%Y%m%d")


def test_out_folder_must_be_new_or_empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runfolder.create_run_folder("generate", out=empty) == empty
    (empty / "image.png").write_bytes(b"old")
    with pytest.raises(runfolder.RunFolderError, match="exists.*pass a new folder"):
        runfolder.create_run_folder("generate", out=empty)
    assert (empty / "image.png").read_bytes() == b"old"
    assert runfolder.create_run_folder("sweep", out=empty, resume=True) == empty
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(runfolder.RunFolderError, match="is a file"):
        runfolder.create_run_folder("generate", out=a_file)


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "result.json"
    runfolder.write_json_atomic(path, {"v": 1})

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        runfolder.write_json_atomic(path, {"v": Unserialisable()})
    assert json.loads(path.read_text()) == {"v": 1}

    class BrokenImage:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError):
        runfolder.save_image_atomic(BrokenImage(), tmp_path / "image.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_manifest_records_settings_versions_and_timings(tmp_path):
    import torch

    timings = runfolder.Timings()
    with timings.phase("load"):
        pass
    manifest = runfolder.build_manifest("generate", {"seed": 3, "steps": 2}, model={"model": "m", "revision": "abc"},
                                       timings=timings.as_dict())
    runfolder.write_manifest(tmp_path, manifest)
    stored = runfolder.read_manifest(tmp_path)
    assert stored["settings"] == {"seed": 3, "steps": 2}
    assert stored["model"]["revision"] == "abc"
    assert stored["versions"]["torch"] == torch.__version__.split("+")[0] or stored["versions"]["torch"] == torch.__version__
    assert set(stored["timings"]) == {"load", "total"}
