"""Edits from Python and capture, reweight and edit from the CLI on PixArt-Sigma, Sana and Flux folders.

Tiny random pipelines saved to disk and loaded back, as a user's folder is.
References are independent of xattn: diffusers' own pipeline calls with the
same seed (the source row of an edit, an edit that replaces nothing, the
images ``xattn generate`` and ``xattn reweight --weights 1`` write), the
pieces the text encoder actually received (where a word's columns are), and
``probs`` hooks that record the maps after the edit controllers ran.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import xattn
from tiny_flux import load_flux_pipeline, save_flux_pipeline
from tiny_models import build_sana, encoder_input_ids, load_sana
from tiny_pixart import load_pixart, save_pixart
from xattn.capture.export import load_maps
from xattn.cli import app
from xattn.edit import EditError, edit
from xattn.edit import run as edit_run

SOURCE, TARGET = "a red circle", "a blue circle"


# -- the pipelines ----------------------------------------------------------------------


# family -> (save, load, width, height, guidance); sizes: PixArt's VAE keeps the size (2x2 patches), Sana's DC-AE
# divides it by 4, Flux packs 2x2 latent pixels per token. Non-square, so width and height cannot swap unseen.
FAMILIES = {
    "pixart": (save_pixart, load_pixart, 16, 8, 4.5),
    "sana": (build_sana, load_sana, 64, 32, 4.5),
    "flux": (save_flux_pipeline, load_flux_pipeline, 24, 16, 3.5),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def folder(family):
        if family not in made:
            made[family] = FAMILIES[family][0](tmp_path_factory.mktemp(family) / "pipe")
        return made[family]

    return folder


@pytest.fixture(scope="module")
def pipes(folders):
    loaded = {}

    def pipe(family):
        if family not in loaded:
            loaded[family] = FAMILIES[family][1](folders(family))
        return loaded[family]

    return pipe


def stock(pipe, family, prompt, seed, steps=3, output_type="latent"):
    """diffusers' own call (no hooks) at the family's size: the final latent, or a PIL image."""
    _, _, width, height, guidance = FAMILIES[family]
    binning = {} if family == "flux" else {"use_resolution_binning": False}
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                    output_type=output_type, generator=torch.Generator().manual_seed(seed), **binning).images[0]


def fast(family):
    _, _, width, height, guidance = FAMILIES[family]
    return dict(steps=3, guidance=guidance, size=f"{width}x{height}", output_type="latent")


# -- edit() on PixArt and Sana ------------------------------------------------------------

EDITED = ["pixart", "sana"]


@pytest.mark.parametrize("family", EDITED)
def test_local_blend_keeps_the_source_outside_its_mask(pipes, family, monkeypatch):
    """PixArt steps through diffusers' older ``callback(step, t, latents)``, Sana through ``callback_on_step_end``."""
    pipe = pipes(family)
    installed = []  # the controllers the edit installs (LocalBlend keeps its last mask)
    monkeypatch.setattr(edit_run, "hooks", lambda model, *controllers, **names: installed.extend(controllers)
                        or xattn.hooks(model, *controllers, **names))
    injection = {"self_steps": None} if family == "sana" else {}
    threshold = 0.97  # tiny random models spread a word's map almost evenly
    result = edit(pipe, SOURCE, TARGET, seed=2, blend="circle", threshold=threshold, blend_dilate=0, reprompt=False,
                  **injection, **fast(family))
    mask = next(c for c in installed if type(c).__name__ == "LocalBlend").last_masks[0]  # [H, W] on the latent
    source, target = result.source, result.targets[0]  # [C, H, W] final latents
    assert mask.shape == tuple(source.shape[-2:]) and 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(target[:, ~mask], source[:, ~mask])  # kept from the source, exactly
    assert (target[:, mask] - source[:, mask]).abs().max() > 1e-6  # edited inside


@pytest.mark.parametrize("family", EDITED)
def test_source_and_reprompt_are_the_stock_samples_and_the_edit_changes_the_target(pipes, family):
    pipe = pipes(family)
    # Sana's self-attention is linear (no maps to inject): its edits run without self-attention injection
    injection = {"self_steps": None} if family == "sana" else {}
    result = edit(pipe, SOURCE, TARGET, seed=2, **injection, **fast(family))
    assert (result.source - stock(pipe, family, SOURCE, 2)).abs().max() <= 1e-5
    assert (result.reprompts[0] - stock(pipe, family, TARGET, 2)).abs().max() <= 1e-5
    assert (result.targets[0] - result.reprompts[0]).abs().max() > 1e-4
    width, height = FAMILIES[family][2:4]
    assert result.settings["size"] == f"{width}x{height}" and result.settings["modes"] == ["replace"]
    kinds = [c["edit"] for c in result.settings["controllers"]]
    assert kinds == (["autoedit"] if family == "sana" else ["autoedit", "self_inject"])


def test_self_attention_injection_is_refused_by_name_on_sana(pipes):
    with pytest.raises(EditError, match="no softmax self-attention.*self_steps=None"):
        edit(pipes("sana"), SOURCE, TARGET, seed=2, self_steps="0:0.4", **fast("sana"))


@pytest.mark.parametrize("family", EDITED)
def test_an_edit_that_replaces_nothing_is_the_plain_target(pipes, family):
    pipe = pipes(family)
    result = edit(pipe, SOURCE, TARGET, seed=2, cross_steps="0:0", self_steps=None, reprompt=False, **fast(family))
    assert (result.targets[0] - stock(pipe, family, TARGET, 2)).abs().max() <= 1e-5


def record_maps(monkeypatch):
    """Install, with the edit's controllers, a ``probs`` hook keeping each cross site's maps after the edit:
    (site, step) -> (source's conditional row, target's), each [heads, image, text]."""
    seen = {}

    def keep(probs, ctx):
        rows = list(ctx.layout.rows)
        source, target = rows.index(xattn.Row(True, 0, 0)), rows.index(xattn.Row(True, 1, 0))
        seen[(ctx.site.name, ctx.step)] = (probs[source].detach().clone(), probs[target].detach().clone())

    hook = xattn.Hook("probs", keep, "kind=cross")
    monkeypatch.setattr(edit_run, "hooks", lambda model, *controllers, **names: xattn.hooks(model, *controllers,
                                                                                             hook, **names))
    return seen


def pieces_received(pipe, prompt) -> list[str]:
    """The pieces at each column of the pipeline's conditional text, from the ids its text encoder received
    (Sana: ``<bos>`` and the last ``length - 1`` of instruction + prompt, as SanaPipeline.encode_prompt selects)."""
    import inspect

    call = inspect.signature(type(pipe).__call__).parameters
    encode = inspect.signature(pipe.encode_prompt).parameters
    # what the pipeline's __call__ hands encode_prompt by default (Sana: its instruction; PixArt: clean_caption)
    options = {name: call[name].default for name in ("complex_human_instruction", "clean_caption")
               if name in call and name in encode}
    ids, embeds = encoder_input_ids(pipe, prompt, **options)
    length = embeds.shape[1]
    if len(ids) > length:  # Sana: the instruction's slots are cut off again
        ids = [ids[0]] + ids[len(ids) - (length - 1):]
    return pipe.tokenizer.convert_ids_to_tokens(ids)


def columns_of(pieces: list[str], word: str) -> list[int]:
    """The columns whose pieces spell `` word`` (a bare ``▁`` first belongs to it), after the last ``:``
    (Sana's instruction ends in ``User Prompt: ``)."""
    colon = max([i for i, piece in enumerate(pieces) if ":" in piece], default=-1)
    for start in range(colon + 1, len(pieces)):
        if not pieces[start].startswith("\u2581"):
            continue
        text = ""
        for end in range(start, len(pieces)):
            text += pieces[end]
            if text.replace("\u2581", " ").strip() == word:
                return list(range(start, end + 1))
            if len(text) > len(word) + 1:
                break
    raise AssertionError(f"{word!r} not in {pieces}")


@pytest.mark.parametrize("family", EDITED)
def test_the_target_takes_the_source_maps_inside_the_replace_window(pipes, family, monkeypatch):
    """A swap of two one-piece words: every column of the target's image->text maps is the source's."""
    pipe = pipes(family)
    source, target = "a cat on a tree", "a dog on a tree"
    for prompt, word in ((source, "cat"), (target, "dog")):
        pieces = pieces_received(pipe, prompt)
        assert len(columns_of(pieces, word)) == 1, pieces
    seen = record_maps(monkeypatch)
    edit(pipe, source, target, seed=2, cross_steps="0:2", self_steps=None, reprompt=False, **fast(family))
    assert len(seen) == 2 * 3  # two cross sites, three steps
    for (site, step), (source_maps, target_maps) in seen.items():
        difference = (target_maps - source_maps).abs().max().item()
        assert difference == 0 if step < 2 else difference > 1e-6, (site, step)


@pytest.mark.parametrize("family", EDITED)
def test_a_swap_of_words_with_other_piece_counts_moves_the_source_maps_to_the_targets_columns(
        pipes, family, monkeypatch):
    """``pink`` (PixArt's T5: letter pieces) or ``red`` (Sana's Gemma: 3 pieces) swapped for ``green`` (one piece): the
    words after it sit in other columns of the target's text; each takes the maps of its own word in the source."""
    pipe = pipes(family)
    swapped = "pink" if family == "pixart" else "red"
    source, target = f"a {swapped} circle on a tree", "a green circle on a tree"
    source_pieces, target_pieces = pieces_received(pipe, source), pieces_received(pipe, target)
    assert len(columns_of(source_pieces, swapped)) > 1 and len(columns_of(target_pieces, "green")) == 1
    seen = record_maps(monkeypatch)
    edit(pipe, source, target, seed=2, cross_steps="0:3", self_steps=None, reprompt=False, **fast(family))
    assert len(seen) == 2 * 3
    for (site, step), (source_maps, target_maps) in seen.items():
        for word in ("circle", "on", "tree"):
            (was,), (now,) = columns_of(source_pieces, word), columns_of(target_pieces, word)
            assert was != now
            assert torch.equal(target_maps[..., now], source_maps[..., was]), (site, step, word)
        # the swapped word's attention is moved onto the one piece, never created or lost
        moved = source_maps[..., columns_of(source_pieces, swapped)].sum(-1)
        (green,) = columns_of(target_pieces, "green")
        assert torch.allclose(target_maps[..., green], moved, atol=1e-6), (site, step)
        assert torch.allclose(target_maps.sum(-1), torch.ones(()), atol=1e-5)  # still a distribution per pixel


# -- the CLI on saved folders ---------------------------------------------------------------


@pytest.fixture
def cli_ok(monkeypatch, tmp_path):
    """The CLI in a scratch folder, failing the test unless it exits 0 (conftest's `cli` returns the result)."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    return invoke


def run_options(family, folders, out, seed=1):
    _, _, width, height, guidance = FAMILIES[family]
    return ["--model", folders(family), "--out", out, "--steps", 2, "--size", f"{width}x{height}", "--seed", seed,
            "--guidance", guidance, "--device", "cpu", "--threads", 1, "--no-progress"]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB"),
                      dtype=np.int16)


def manifest_of(folder) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    return manifest


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cli_generate_writes_the_stock_pipelines_image(cli_ok, folders, pipes, family, tmp_path):
    cli_ok("generate", SOURCE, *run_options(family, folders, tmp_path / "gen"))
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["image-0.png", "manifest.json"]
    manifest = manifest_of(tmp_path / "gen")
    assert manifest["settings"]["seed"] == 1 and manifest["settings"]["steps"] == 2
    reference = stock(pipes(family), family, SOURCE, 1, steps=2, output_type="pil")
    assert np.abs(pixels(tmp_path / "gen" / "image-0.png") - pixels(reference)).max() <= 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cli_maps_record_the_prompts_words_on_the_latent_grid(cli_ok, folders, family, tmp_path):
    _, _, width, height, _ = FAMILIES[family]
    cli_ok("maps", SOURCE, *run_options(family, folders, tmp_path / "maps"))
    maps = load_maps(tmp_path / "maps")
    grid = {"pixart": (height // 2, width // 2), "sana": (height // 4, width // 4),
            "flux": (height // 2, width // 2)}[family]
    assert maps.words() == ["a", "red", "circle"] and maps.image_size == (height, width)
    assert maps.resolutions == [grid] and maps.num_steps == 2
    circle = maps.word("circle", normalize=False, size=grid)
    assert circle.shape == grid and float(circle.min()) >= 0 and float(circle.max()) > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cli_reweight_weight_one_is_the_stock_image_and_zero_changes_it(cli_ok, folders, pipes, family, tmp_path):
    out = tmp_path / "reweight"
    cli_ok("reweight", SOURCE, "--word", "red", "--weights", "0,1", *run_options(family, folders, out))
    manifest = manifest_of(out)
    cells = manifest["reweight"]["cells"]
    assert [(c["weight"], c["seed"]) for c in cells] == [(0.0, 1), (1.0, 1)]
    assert all((out / c["file"]).is_file() for c in cells) and (out / "grid.png").is_file()
    reference = pixels(stock(pipes(family), family, SOURCE, 1, steps=2, output_type="pil"))
    zero, one = (pixels(out / c["file"]) for c in cells)
    assert np.abs(one - reference).max() <= 1
    assert np.abs(zero - reference).max() > 0  # zeroing "red" changed the image


@pytest.mark.parametrize("family", EDITED)
def test_cli_edit_runs_on_a_saved_folder(cli_ok, folders, pipes, family, tmp_path):
    out = tmp_path / "edit"
    cli_ok("edit", "--source", SOURCE, "--target", TARGET, "--blend", "circle", *run_options(family, folders, out, 2))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "reprompt.png", "sheet.png", "source.png", "target.png"]
    manifest = manifest_of(out)
    assert manifest["edit"]["source"] == SOURCE and manifest["edit"]["targets"] == [TARGET]
    assert manifest["edit"]["modes"] == ["replace"]
    kinds = [c.get("edit") for c in manifest["edit"]["controllers"]]
    # Sana: its linear self-attention has no maps, so the default self-attention window is dropped
    assert kinds == ["local_blend", "autoedit"] + ([] if family == "sana" else ["self_inject"])
    pipe = pipes(family)
    for name, prompt in (("source.png", SOURCE), ("reprompt.png", TARGET)):
        reference = stock(pipe, family, prompt, 2, steps=2, output_type="pil")
        assert np.abs(pixels(out / name) - pixels(reference)).max() <= 1, name
    assert np.abs(pixels(out / "target.png") - pixels(out / "reprompt.png")).max() > 0


def test_the_users_older_callback_still_runs_every_callback_steps_beside_local_blend(pipes):
    """xattn takes PixArt's ``callback`` at every step; the user's own runs at the steps they asked for."""
    pipe = pipes("pixart")
    _, _, width, height, guidance = FAMILIES["pixart"]
    seen = []
    blend = xattn.edit.LocalBlend("circle", 0.97)
    with xattn.hooks(pipe, blend, xattn.edit.Replace(steps="0:2")), torch.no_grad():
        pipe([SOURCE, TARGET], num_inference_steps=4, guidance_scale=guidance, width=width, height=height,
             output_type="latent", use_resolution_binning=False, generator=torch.Generator().manual_seed(2),
             callback=lambda step, t, latents: seen.append((step, latents.shape[0])), callback_steps=2)
    assert seen == [(0, 2), (2, 2)]
    assert blend.last_masks is not None  # LocalBlend ran between steps
