"""Export: maps written as safetensors + a JSON manifest read back to the same word maps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import tiny_models
import xattn
from xattn.capture import Capture
from xattn.capture.export import load_maps, save_maps

PROMPTS = ["a red cat", "a blue xylophonist"]


def captured(pipe, capture):
    with xattn.hooks(pipe, capture):
        pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
             generator=torch.Generator().manual_seed(7))
    return capture.maps()


@pytest.mark.parametrize("per_step", [False, True], ids=["aggregated", "per-step"])
def test_round_trip_gives_the_same_maps(sd1_pipe, tmp_path, per_step):
    maps = captured(sd1_pipe, Capture(per_step=per_step))
    save_maps(maps, tmp_path / "run", seed=7)
    loaded = load_maps(tmp_path / "run")
    assert loaded.image_size == maps.image_size and loaded.steps == maps.steps == [0, 1, 2]
    assert loaded.per_step == per_step
    for prompt in range(2):
        assert loaded.words(prompt) == maps.words(prompt)
        for image in range(2):
            for word in maps.words(prompt) + ["<end>", "<pad>"]:
                assert torch.equal(loaded.word(word, prompt, image), maps.word(word, prompt, image))
            assert loaded.token_totals(prompt, image) == pytest.approx(maps.token_totals(prompt, image))
    if per_step:
        assert torch.equal(loaded.word("cat", steps="1:2"), maps.word("cat", steps="1:2"))


def test_manifest_says_what_was_captured(sd1_pipe, tmp_path):
    maps = captured(sd1_pipe, Capture("res=8"))
    save_maps(maps, tmp_path, seed=7, extra={"note": "test"})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["prompts"] == PROMPTS
    assert manifest["token_maps"][1]["words"][2]["text"] == "xylophonist"
    assert len(manifest["token_maps"][1]["words"][2]["slots"]) > 1
    sites_at_8 = {s.name for s in xattn.sites(sd1_pipe) if s.kind == "cross"
                  and (s.name.startswith("down_blocks.1") or s.name.startswith("up_blocks.1"))}
    assert set(manifest["sites"]) == sites_at_8
    assert manifest["steps"] == [0, 1, 2] and manifest["num_steps"] == 3
    assert manifest["scheduler"] == "DDIMScheduler" and manifest["seed"] == 7
    assert manifest["model"]
    assert {"xattn", "torch", "diffusers", "transformers", "safetensors", "python"} <= set(manifest["versions"])
    assert manifest["rows"] == [{"cond": True, "prompt": p, "image": i} for p in range(2) for i in range(2)]
    assert manifest["note"] == "test"
    with safe_open(str(tmp_path / "maps.safetensors"), framework="pt") as handle:
        (key,) = handle.keys()
        # [rows, heads, i, j]: slots up to the longer prompt's end token, then the summed padding
        kept = max(len(tiny_models.tokenizer().tokenize(p)) + 2 for p in PROMPTS)
        assert list(handle.get_tensor(key).shape) == [4, 1, 64, kept + 1]
    assert manifest["columns"] == list(range(kept)) and manifest["others"] is True
    assert manifest["layers"][0]["key"] == key and manifest["layers"][0]["res"] == [8, 8]


def test_per_step_maps_are_stored_in_fp16(sd1_pipe, tmp_path):
    save_maps(captured(sd1_pipe, Capture(per_step=True)), tmp_path)
    with safe_open(str(tmp_path / "maps.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}


def test_never_overwrites_and_says_what_is_missing(sd1_pipe, tmp_path):
    maps = captured(sd1_pipe, Capture())
    save_maps(maps, tmp_path)
    before = (tmp_path / "maps.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_maps(maps, tmp_path)
    assert (tmp_path / "maps.safetensors").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="maps.safetensors is missing"):
        load_maps(tmp_path / "elsewhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "maps.safetensors").write_bytes(before)
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an xattn maps manifest"):
        load_maps(tmp_path / "other")


def test_loader_reads_a_run_manifest_that_nests_the_maps(sd1_pipe, tmp_path):
    from xattn.capture.export import maps_manifest

    maps = captured(sd1_pipe, Capture())
    save_maps(maps, tmp_path, manifest=False)
    (tmp_path / "manifest.json").write_text(json.dumps({"command": "maps", "maps": maps_manifest(maps)}))
    assert torch.equal(load_maps(tmp_path).word("cat"), maps.word("cat"))
