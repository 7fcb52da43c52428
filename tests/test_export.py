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


def same_words(loaded, live, prompt=0):
    """The loaded token map resolves every word, name and slot as the live one, and so do the maps."""
    got, expected = loaded.token_map(prompt), live.token_map(prompt)
    assert type(got) is type(expected) and got.to_dict() == expected.to_dict()
    assert loaded.words(prompt) == live.words(prompt)
    for slot in range(expected.max_length):
        assert got.word_at(slot) == expected.word_at(slot), slot
    for word in live.words(prompt) + ["<end>", "<pad>"]:
        assert got.indices(word) == expected.indices(word), word
        assert torch.equal(loaded.word(word, prompt), live.word(word, prompt)), word
    for name in ("<start>", "<bos>"):
        try:
            wanted = expected.indices(name)
        except KeyError:
            with pytest.raises(KeyError):
                got.indices(name)
        else:
            assert got.indices(name) == wanted
    assert loaded.token_totals(prompt) == pytest.approx(live.token_totals(prompt))


def test_a_long_prompts_chunks_survive_save_and_load(sd1_pipe, tmp_path):
    from xattn.prompts import encode_prompt

    prompt = " ".join(["a red circle,"] * 30) + " and a (giraffe:1.5) in the corner"
    embeds = encode_prompt(sd1_pipe, prompt, emphasis=False)
    capture = Capture(slots="all")
    with xattn.hooks(sd1_pipe, capture, prompts=[prompt], tokenizer=embeds.tokenizer):
        sd1_pipe(**embeds.pipeline_kwargs(), num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="latent")
    live = capture.maps()
    token_map = live.token_map(0)
    assert token_map.chunks is not None and token_map.chunks.num_chunks == 2
    assert min(token_map.indices("giraffe")) >= 77 and token_map.word_at(77) == "<start>"
    save_maps(live, tmp_path / "long")
    loaded = load_maps(tmp_path / "long")
    assert loaded.token_map(0).chunks == token_map.chunks
    same_words(loaded, live)
    assert torch.equal(loaded.word("giraffe"), live.word("giraffe"))


def test_sd3_clip_and_t5_parts_survive_save_and_load(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from joint_reference import sd3_pipeline
    from tiny_t5 import t5_encoder, t5_tokenizer
    from xattn.token_parts import PartsTokenMap

    clip_only = sd3_pipeline(tmp_path / "clip")
    StableDiffusion3Pipeline(**{**clip_only.components, "text_encoder_3": t5_encoder(hidden=32),
                                "tokenizer_3": t5_tokenizer(max_length=16)}).save_pretrained(tmp_path / "t5")
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "t5", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    capture = Capture()
    with torch.no_grad(), xattn.hooks(pipe, capture):
        pipe("a red circle and a red square", negative_prompt="", num_inference_steps=2, guidance_scale=3.0,
             height=16, width=24, max_sequence_length=16, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    live = capture.maps()
    assert isinstance(live.token_map(0), PartsTokenMap)
    assert live.token_map(0).indices("circle") == [3, 77 + 2] and live.token_map(0).parts[1][1].start_slots == 0
    save_maps(live, tmp_path / "maps")
    loaded = load_maps(tmp_path / "maps")
    same_words(loaded, live)
    assert loaded.token_map(0).indices("red#2") == live.token_map(0).indices("red#2")


def test_format_1_manifests_still_load(sd1_pipe, tmp_path):
    maps = captured(sd1_pipe, Capture())
    save_maps(maps, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 1
    for token_map in manifest["token_maps"]:  # what format 1 wrote
        for key in ("written", "start_slots", "cut_words", "cut_from", "chunks"):
            token_map.pop(key)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    same_words(load_maps(tmp_path), maps, prompt=1)
