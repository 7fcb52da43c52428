"""prompt-to-prompt on a tiny FluxPipeline: packed latents, T5 words, no unconditional rows.

References are diffusers' own: plain ``FluxPipeline`` calls with the same
seed (the source row, the re-prompt, an edit that replaces nothing), its
``_unpack_latents`` (where LocalBlend kept the source), and ``probs`` hooks
(the target's image->text block inside the Replace window).
"""

from __future__ import annotations

import pytest
import torch

import xattn
from test_edit_run import assert_edit_folder
from tiny_flux import load_flux_pipeline, save_flux_pipeline
from xattn.edit import EditError, edit, edit_seeds, initial_latent
from xattn.edit import run as edit_run
from xattn.edit.blend import LocalBlend

SOURCE, TARGET = "a red circle", "a blue circle"
WIDTH, HEIGHT = 24, 16
FAST = dict(steps=3, guidance=3.5, size=f"{WIDTH}x{HEIGHT}", output_type="latent")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny Flux pipeline of tests/tiny_flux.py, saved."""
    return save_flux_pipeline(tmp_path_factory.mktemp("flux_edit") / "pipe")


@pytest.fixture(scope="module")
def pipe(folder):
    return load_flux_pipeline(folder)


def plain(pipe, prompt, seed=2):
    """A stock FluxPipeline call: the final packed latent [n, c]."""
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=3, guidance_scale=3.5, width=WIDTH, height=HEIGHT,
                    output_type="latent", generator=torch.Generator().manual_seed(seed)).images[0]


def unpacked(pipe, latent):
    """A packed latent [n, c] as diffusers unpacks it: [C, H, W]."""
    return pipe._unpack_latents(latent[None], HEIGHT, WIDTH, pipe.vae_scale_factor)[0]


def test_the_initial_latent_is_the_one_flux_draws(pipe):
    drawn = []
    with torch.no_grad():
        pipe(SOURCE, num_inference_steps=1, width=WIDTH, height=HEIGHT, output_type="latent",
             generator=torch.Generator().manual_seed(7),
             callback_on_step_end=lambda p, i, t, kw: drawn.append(kw["latents"]) or {})
    latent = initial_latent(pipe, 7, WIDTH, HEIGHT)
    assert latent.shape == (1, (HEIGHT // 2) * (WIDTH // 2), 16)
    # the stock draw, packed by diffusers itself
    noise = torch.randn(1, 4, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(7))
    assert torch.equal(latent, pipe._pack_latents(noise, 1, 4, HEIGHT, WIDTH))
    with pytest.raises(EditError, match="twice the VAE's factor"):
        initial_latent(pipe, 7, WIDTH + 1, HEIGHT)


def test_source_and_reprompt_are_the_stock_samples_and_the_edit_changes_the_target(pipe):
    result = edit(pipe, SOURCE, TARGET, seed=2, **FAST)
    assert (result.source - plain(pipe, SOURCE)).abs().max() <= 1e-5
    assert (result.reprompts[0] - plain(pipe, TARGET)).abs().max() <= 1e-5
    assert (result.targets[0] - result.reprompts[0]).abs().max() > 1e-4
    assert result.settings["size"] == f"{WIDTH}x{HEIGHT}" and result.settings["modes"] == ["replace"]


def test_several_seeds_in_one_batch_are_each_seeds_stock_sample(pipe):
    results = edit_seeds(pipe, SOURCE, TARGET, [2, 5], reprompt=False, **FAST)
    for result, seed in zip(results, [2, 5]):
        assert (result.source - plain(pipe, SOURCE, seed)).abs().max() <= 1e-5


def test_an_edit_that_replaces_nothing_is_the_plain_target(pipe):
    result = edit(pipe, SOURCE, TARGET, seed=2, cross_steps="0:0", self_steps=None, reprompt=False, **FAST)
    assert (result.targets[0] - plain(pipe, TARGET)).abs().max() <= 1e-5


def test_the_target_takes_the_source_maps_inside_the_replace_window(pipe, monkeypatch):
    seen = {}  # (site, step) -> the image->text block after the edit, [2, heads, image, text]
    keep = xattn.Hook("probs", lambda p, ctx: seen.__setitem__((ctx.site.name, ctx.step), p.clone()), "kind=joint")
    monkeypatch.setattr(edit_run, "hooks", lambda model, *controllers, **names: xattn.hooks(model, *controllers,
                                                                                             keep, **names))
    edit(pipe, SOURCE, TARGET, seed=2, cross_steps="0:2", self_steps=None, reprompt=False, **FAST)
    assert len(seen) == 2 * 3  # two joint sites, three steps
    for (site, step), block in seen.items():
        assert block.shape[0] == 2  # the source's row and the target's: no unconditional rows
        difference = (block[1] - block[0]).abs().max().item()
        assert difference == 0 if step < 2 else difference > 1e-6, (site, step)


def test_local_blend_keeps_the_source_outside_its_mask_on_packed_latents(pipe, monkeypatch):
    installed = []  # the controllers the edit installs (LocalBlend keeps its last mask)
    monkeypatch.setattr(edit_run, "hooks", lambda model, *controllers, **names: installed.extend(controllers)
                        or xattn.hooks(model, *controllers, **names))
    result = edit(pipe, SOURCE, TARGET, seed=2, blend="circle", threshold=0.5, blend_dilate=0, reprompt=False,
                  **FAST)
    blend = next(c for c in installed if isinstance(c, LocalBlend))
    mask = blend.last_masks[0]  # [H, W] bool, on the unpacked latent grid
    assert mask.shape == (HEIGHT, WIDTH) and 0 < int(mask.sum()) < mask.numel()
    source, target = unpacked(pipe, result.source), unpacked(pipe, result.targets[0])  # [C, H, W]
    assert torch.equal(target[:, ~mask], source[:, ~mask])  # kept from the source, exactly
    assert (target[:, mask] - source[:, mask]).abs().max() > 1e-6  # edited inside
    free = edit(pipe, SOURCE, TARGET, seed=2, reprompt=False, **FAST)
    assert (result.targets[0] - free.targets[0]).abs().max() > 1e-6  # the blend changed the edit


def test_by_default_self_attention_is_injected_at_every_site_whatever_the_grid(pipe, monkeypatch):
    """``self_res="auto"`` on a transformer: its sites share one patch grid, 64 x 64 for a 1024^2 image, past
    prompt-to-prompt's ``<=32``; the default injects at every site there rather than nowhere."""
    from xattn.edit.controllers import SelfInject

    seen = []
    original = SelfInject.map_rows

    def spy(self, x, ctx):
        seen.append(ctx.res)
        return original(self, x, ctx)

    monkeypatch.setattr(SelfInject, "map_rows", spy)
    cell = 2 * pipe.vae_scale_factor  # image pixels per grid cell: the VAE's factor, then 2x2 packing
    result = edit(pipe, SOURCE, TARGET, seed=2, steps=3, guidance=3.5, size=f"{36 * cell}x{4 * cell}",
                  output_type="latent", reprompt=False)  # a 36 x 4 grid (sizes stay multiples of 8)
    assert seen and all(max(res) == 36 for res in seen)
    (inject,) = [c for c in result.settings["controllers"] if c["edit"] == "self_inject"]
    assert "res" not in inject["selector"]


def test_a_negative_prompt_is_refused_by_name(pipe):
    with pytest.raises(EditError, match="negative prompt.*true CFG"):
        edit(pipe, SOURCE, TARGET, seed=2, negative_prompt="a green square", **FAST)


def test_cli_edit_runs_on_a_saved_flux_folder(cli, folder, tmp_path):
    result = cli("edit", "--source", SOURCE, "--target", TARGET, "--blend", "circle", "--seed", 2, "--steps", 2,
                 "--guidance", 3.5, "--size", f"{WIDTH}x{HEIGHT}", "--model", folder, "--device", "cpu",
                 "--out", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    assert_edit_folder(tmp_path / "run", TARGET)
    refused = cli("edit", "--source", SOURCE, "--target", TARGET, "--negative-prompt", "a green square",
                  "--steps", 2, "--size", f"{WIDTH}x{HEIGHT}", "--model", folder, "--device", "cpu",
                  "--out", tmp_path / "refused", "--no-progress")
    assert refused.exit_code == 2 and "true CFG" in refused.output, refused.output
    from PIL import Image

    Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "input.png")
    refused = cli("edit", "--source", SOURCE, "--target", TARGET, "--image", tmp_path / "input.png",
                  "--steps", 2, "--size", f"{WIDTH}x{HEIGHT}", "--model", folder, "--device", "cpu",
                  "--out", tmp_path / "inverted", "--no-progress")
    assert refused.exit_code == 2 and "inverted image" in refused.output, refused.output


def test_local_blend_packs_and_unpacks_as_flux_does(pipe):
    from xattn.edit.blend import pack, unpack

    latents = torch.randn(3, 4, HEIGHT, WIDTH)
    packed = pipe._pack_latents(latents, 3, 4, HEIGHT, WIDTH)
    assert torch.equal(pack(latents), packed)
    assert torch.equal(unpack(packed, (HEIGHT, WIDTH)), pipe._unpack_latents(packed, HEIGHT, WIDTH, 1))
    with pytest.raises(EditError, match="packed tokens"):
        unpack(packed, (HEIGHT, WIDTH + 2))
