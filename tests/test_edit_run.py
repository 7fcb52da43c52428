"""edit(): one batch from one latent, several targets, SDXL, files on disk, and `xattn edit`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xattn import TokenError, runner
from xattn.edit import EditError, build_controllers, edit, edit_seeds, initial_latent
from xattn.app.runfolder import RunFolderError

import tiny_models

SOURCE = "a red circle and a blue square"
TARGET = "a green circle and a blue square"
FAST = dict(steps=3, guidance=5.0, seed=3)


def assert_edit_folder(folder, target: str) -> dict:
    """A finished `xattn edit` run of one target with a blend: its files and controllers; returns its manifest."""
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["manifest.json", "reprompt.png", "sheet.png", "source.png", "target.png"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["edit"]["targets"] == [target]
    assert [c.get("edit") for c in manifest["edit"]["controllers"]] == ["local_blend", "autoedit", "self_inject"]
    return manifest


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def plain_latent(pipe, prompt, seed=3, steps=3, guidance=5.0):
    """What `xattn generate --seed` samples, as the final latent."""
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_source_is_the_plain_sample_of_its_seed_and_reprompt_the_targets(sd1_pipe):
    result = edit(sd1_pipe, SOURCE, TARGET, blend="circle", output_type="latent", **FAST)
    # The edit never touches the source rows; fused vs explicit attention may differ by rounding only.
    assert (result.source - plain_latent(sd1_pipe, SOURCE)).abs().max() <= 1e-4
    assert (result.reprompts[0] - plain_latent(sd1_pipe, TARGET)).abs().max() <= 1e-4
    assert (result.targets[0] - result.reprompts[0]).abs().max() > 1e-2  # the edit changed the target


def test_images_of_the_edit_are_those_of_runner_generate(sd1_pipe):
    result = edit(sd1_pipe, SOURCE, TARGET, **FAST)
    assert np.abs(pixels(result.source) - pixels(runner.generate(sd1_pipe, SOURCE, **FAST)[0])).max() <= 1
    assert np.abs(pixels(result.reprompts[0]) - pixels(runner.generate(sd1_pipe, TARGET, **FAST)[0])).max() <= 1


def test_several_targets_in_one_batch_equal_separate_edits(sd1_pipe):
    targets = ["a green circle and a blue square", "a red circle and a blue triangle"]
    together = edit(sd1_pipe, SOURCE, targets, reprompt=False, output_type="latent", **FAST)
    for index, target in enumerate(targets):
        alone = edit(sd1_pipe, SOURCE, target, reprompt=False, output_type="latent", **FAST)
        assert (together.targets[index] - alone.targets[0]).abs().max() <= 1e-4, target
    assert (together.targets[0] - together.targets[1]).abs().max() > 1e-2
    assert len(together.targets) == 2 and together.reprompts == []


def test_several_seeds_in_one_batch_equal_one_edit_per_seed(sd1_pipe):
    targets = ["a green circle and a blue square", "a red circle and a blue triangle"]
    results = edit_seeds(sd1_pipe, SOURCE, targets, [3, 8], blend="circle", output_type="latent",
                         steps=3, guidance=5.0)
    assert [r.settings["seed"] for r in results] == [3, 8]
    for result, seed in zip(results, (3, 8)):
        alone = edit(sd1_pipe, SOURCE, targets, seed=seed, blend="circle", output_type="latent", steps=3, guidance=5.0)
        assert (result.source - alone.source).abs().max() <= 1e-4
        for got, expected in zip(result.targets + result.reprompts, alone.targets + alone.reprompts):
            assert (got - expected).abs().max() <= 1e-4
    assert (results[0].source - results[1].source).abs().max() > 1e-2  # the seeds really differ


def test_swap_then_reweight_changes_the_target_only(sd1_pipe):
    plain = edit(sd1_pipe, SOURCE, TARGET, reprompt=False, output_type="latent", **FAST)
    weighted = edit(sd1_pipe, SOURCE, TARGET, reweight={"green": 4.0}, reprompt=False, output_type="latent", **FAST)
    assert torch.equal(weighted.source, plain.source)
    assert (weighted.targets[0] - plain.targets[0]).abs().max() > 1e-2
    kinds = [c["edit"] if "edit" in c else "reweight" for c in weighted.settings["controllers"]]
    assert kinds == ["reweight", "autoedit", "self_inject"]


def test_sdxl_architecture_runs_an_edit_end_to_end(sdxl_pipe):
    result = edit(sdxl_pipe, "a red circle", ["a red square", "a big red circle"], blend="circle",
                  self_res="<=16", **FAST)
    size = sdxl_pipe.unet.config.sample_size * sdxl_pipe.vae_scale_factor
    assert result.source.size == (size, size) and len(result.targets) == 2 and len(result.reprompts) == 2
    assert result.settings["modes"] == ["replace", "refine"]
    latents = edit(sdxl_pipe, "a red circle", "a red square", blend="circle", self_res="<=16", output_type="latent",
                   **FAST)
    assert (latents.targets[0] - latents.reprompts[0]).abs().max() > 1e-2


def test_save_writes_every_file_and_never_overwrites(sd1_pipe, tmp_path):
    result = edit(sd1_pipe, SOURCE, TARGET, **FAST)
    written = result.save(tmp_path / "run")
    assert sorted(p.name for p in written) == ["edit.json", "reprompt.png", "sheet.png", "source.png", "target.png"]
    manifest = json.loads((tmp_path / "run" / "edit.json").read_text())
    assert manifest["settings"]["targets"] == [TARGET] and manifest["settings"]["seed"] == 3
    before = (tmp_path / "run" / "source.png").read_bytes()
    with pytest.raises(RunFolderError, match="already holds source.png, .*edit.json; an edit never overwrites"):
        result.save(tmp_path / "run")
    assert (tmp_path / "run" / "source.png").read_bytes() == before


@pytest.mark.parametrize("options, error, message", [
    (dict(targets=[]), EditError, "at least one target"),
    (dict(mode="swap"), EditError, "one of auto, replace, refine, not .swap."),
    (dict(mode="replace", targets=["a big red circle and a blue square"]), EditError, "same number of words"),
    (dict(blend="hat"), EditError, r"\['hat'\] are neither in the source"),
    (dict(reweight={"hat": 2.0}), TokenError, "'hat' is not in the prompt"),
    (dict(cross_steps={"default": 0.8, "hat": 0.2}), EditError, "'hat', which is in no target"),
    (dict(self_steps="0:x"), EditError, "not a number"),
])
def test_bad_edits_fail_before_sampling(options, error, message):
    arguments = dict(targets=[TARGET])
    arguments.update(options)
    targets = arguments.pop("targets")
    with pytest.raises(error, match=message):
        build_controllers(tiny_models.tokenizer(), SOURCE, targets, **arguments)


def test_cli_edit_writes_source_target_reprompt_sheet_and_manifest(cli, sd1_path, tmp_path):
    result = cli("edit", "--source", SOURCE, "--target", TARGET, "--blend", "circle", "--cross-steps", "0:0.8",
                 "--self-steps", "0:0.4", "--seed", 3, "--steps", 3, "--model", sd1_path, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    manifest = assert_edit_folder(tmp_path / "run", TARGET)
    assert "<=32" in manifest["edit"]["controllers"][-1]["selector"]  # --self-res auto on a UNet: prompt-to-prompt's


def test_cli_edit_refuses_bad_options_before_loading(cli, tmp_path):
    result = cli("edit", "--source", SOURCE, "--target", TARGET, "--word-steps", "circle", "--model", tmp_path / "nope")
    assert result.exit_code == 2 and "--word-steps takes WORD=VALUE, e.g. --word-steps circle=0:0.4" in result.output
    result = cli("edit", "--source", SOURCE, "--target", TARGET, "--cross-steps", "1.5", "--model", tmp_path / "nope")
    assert result.exit_code == 2 and "fraction of the schedule" in result.output
    result = cli("edit", "--source", SOURCE, "--target", TARGET, "--reweight", "green=lots")
    assert result.exit_code == 2 and "must be a number" in result.output
    result = cli("edit", "--source", SOURCE, "--target", TARGET, "--self-res", "huge", "--model", tmp_path / "nope")
    assert result.exit_code == 2 and "SelfInject res" in result.output


def test_cli_edit_self_res_all_injects_at_every_size(cli, sd1_path, tmp_path):
    result = cli("edit", "--source", "a red circle", "--target", "a green circle", "--self-res", "all", "--steps", 2,
                 "--model", sd1_path, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    self_inject = [c for c in manifest["edit"]["controllers"] if c.get("edit") == "self_inject"]
    assert len(self_inject) == 1 and "res" not in self_inject[0]["selector"]


def test_cli_edit_several_targets_and_no_self_injection(cli, sd1_path, tmp_path):
    result = cli("edit", "--source", "a red circle", "--target", "a red square", "--target", "a big red circle",
                 "--self-steps", "none", "--word-steps", "square=0:0.3", "--steps", 2, "--model", sd1_path,
                 "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["manifest.json", "reprompt-1.png", "reprompt-2.png", "sheet.png", "source.png",
                     "target-1.png", "target-2.png"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["edit"]["modes"] == ["replace", "refine"]
    assert [c.get("edit") for c in manifest["edit"]["controllers"]] == ["autoedit"]  # no self injection
    assert manifest["edit"]["controllers"][0]["steps"] == {"default": "0.0:0.8", "square": "0.0:0.3"}


def test_cli_edit_takes_its_options_from_a_config(cli, sd1_path, tmp_path):
    config = tmp_path / "edit.yaml"
    config.write_text("mode: refine\nself_steps: none\nsteps: 2\n")
    result = cli("edit", "--source", "a red circle", "--target", "a big red circle", "--config", config,
                 "--model", sd1_path, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["edit"]["modes"] == ["refine"] and manifest["settings"]["steps"] == 2
    assert [c.get("edit") for c in manifest["edit"]["controllers"]] == ["refine"]


def test_edit_refuses_an_unknown_output_type_and_a_latent_size_off_the_vae_grid(sd1_pipe):
    with pytest.raises(EditError, match="output_type must be 'pil' or 'latent', not 'np'"):
        edit(sd1_pipe, SOURCE, TARGET, output_type="np")
    with pytest.raises(EditError, match="size 33x32 must be a multiple of the VAE's factor 2"):
        initial_latent(sd1_pipe, 0, 33, 32)


def test_cli_edit_reads_its_prompts_in_the_syntax(cli, sd1_path, tmp_path):
    manifests = {}
    for syntax in ("a1111", "compel"):
        result = cli("edit", "--source", "a red circle", "--target", "a green++ circle", "--syntax", syntax,
                     "--steps", 2, "--self-steps", "none", "--model", sd1_path, "--out", tmp_path / syntax)
        assert result.exit_code == 0, result.output
        manifests[syntax] = json.loads((tmp_path / syntax / "manifest.json").read_text())
    a1111, compel = manifests["a1111"], manifests["compel"]
    assert a1111["settings"]["syntax"] == "a1111" and compel["settings"]["syntax"] == compel["syntax"] == "compel"
    assert a1111["edit"]["targets"] == ["a green++ circle"] and a1111["prompt_weights"] == {}
    assert compel["edit"]["targets"] == ["a green circle"] and compel["prompt_weights"] == {"green": pytest.approx(1.21)}
    reweights = [c for c in compel["edit"]["controllers"] if "edit" not in c]
    assert len(reweights) == 1 and "green" in json.dumps(reweights[0])
    assert not any("edit" not in c for c in a1111["edit"]["controllers"])
    result = cli("edit", "--source", "a red++ circle", "--target", "a green circle", "--syntax", "compel",
                 "--model", tmp_path / "nope")
    assert result.exit_code == 2 and "an edit keeps the source as it is" in result.output
