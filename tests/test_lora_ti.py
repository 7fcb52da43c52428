"""LoRA (diffusers' PEFT integration, fused and unfused) and textual inversion under xattn's hooks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import tiny_models
import xattn

CALL = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="latent")


def _run(pipe, prompt, *controllers):
    if controllers:
        with xattn.hooks(pipe, *controllers):
            return pipe(prompt, **CALL, generator=torch.Generator().manual_seed(0)).images
    return pipe(prompt, **CALL, generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory, sd1_path):
    folder = tmp_path_factory.mktemp("lora")
    tiny_models.save_unet_lora(tiny_models.load_sd(sd1_path), folder)
    return folder


@pytest.mark.parametrize("fused", [False, True])
def test_hooks_are_exact_on_a_pipeline_with_a_lora(sd1_path, lora_folder, fused):
    plain = _run(tiny_models.load_sd(sd1_path), "a red circle")
    pipe = tiny_models.load_sd(sd1_path)
    pipe.load_lora_weights(lora_folder)
    if fused:
        pipe.fuse_lora()
    stock = _run(pipe, "a red circle")
    assert (stock - plain).abs().max() > 1e-3  # the LoRA is really there
    hooked = _run(pipe, "a red circle", xattn.Hook("value_scale", lambda x, ctx: None))
    torch.testing.assert_close(hooked, stock, rtol=0, atol=1e-5)
    seen = []
    captured = xattn.Capture()
    _run(pipe, "a red circle", captured, xattn.Hook("probs", lambda x, ctx: seen.append(x.sum(-1))))
    assert seen and all(torch.allclose(s, torch.ones_like(s), atol=1e-5) for s in seen)  # rows of real maps
    assert captured.maps().word("circle").shape == (32, 32)


@pytest.fixture
def ti_pipe(sd1_path, tmp_path):
    pipe = tiny_models.load_sd(sd1_path)
    generator = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(3, 32, generator=generator)}, tmp_path / "cats.safetensors")
    save_file({"emb_params": torch.randn(1, 32, generator=generator)}, tmp_path / "dog.safetensors")
    pipe.load_textual_inversion(str(tmp_path / "cats.safetensors"), token="<cats>")
    pipe.load_textual_inversion(str(tmp_path / "dog.safetensors"), token="<dog>")
    return pipe


def test_textual_inversion_tokens_map_to_the_slots_the_pipeline_uses(ti_pipe):
    prompt = "a <cats> and a <dog> circle"
    converted = ti_pipe.maybe_convert_prompt(prompt, ti_pipe.tokenizer)  # what diffusers feeds the tokenizer
    ids = ti_pipe.tokenizer(converted).input_ids
    tokens = xattn.TokenMap(ti_pipe.tokenizer, prompt)
    vocab = ti_pipe.tokenizer.get_vocab()
    assert [ids[s] for s in tokens.indices("<cats>")] == [vocab["<cats>"], vocab["<cats>_1"], vocab["<cats>_2"]]
    assert [ids[s] for s in tokens.indices("<dog>")] == [vocab["<dog>"]]
    assert [ids[s] for s in tokens.indices("circle")] == ti_pipe.tokenizer("circle").input_ids[1:-1]
    assert tokens.end_slot == len(ids) - 1


def test_a_textual_inversion_word_is_reweighted_on_all_its_vectors(ti_pipe):
    prompt = "a <cats> circle"
    slots = xattn.TokenMap(ti_pipe.tokenizer, prompt).indices("<cats>")
    seen = []

    def look(x, ctx):
        seen.append(x[ctx.layout.cond_rows()][:, :6].clone())

    _run(ti_pipe, prompt, xattn.Reweight({"<cats>": 0.5}), xattn.Hook("value_scale", look, "kind=cross"))
    expected = torch.ones(6)
    expected[slots] = 0.5
    assert seen and all(torch.equal(s[0], expected) for s in seen)


def test_a_saved_token_map_still_finds_textual_inversion_words(ti_pipe):
    from xattn.capture.export import restore_token_map

    tokens = xattn.TokenMap(ti_pipe.tokenizer, "a <cats> circle")
    assert restore_token_map(tokens.to_dict()).indices("<cats>") == tokens.indices("<cats>")
