"""prompt-to-prompt on long prompts: 77-slot chunks (CLIP's start and end in each) and BREAK.

References: the plain long-prompt sample (``prompt_kwargs``, as ``xattn generate``
samples it) for the source and for an empty window, the source row's own maps
for a full Replace window, and an explicit probs hook for a weighted chunk-2 word.
"""

from __future__ import annotations

import json

import pytest
import torch

import xattn
from xattn.capture import Capture
from xattn.cli.edit import prompt_weights
from xattn.edit import EditError, build_controllers, edit, initial_latent
from xattn.edit.align import replace_mapper
from xattn.edit.controllers import Replace
from xattn.edit.run import prompt_tokenizer
from xattn.prompts.pipeline import prompt_kwargs
from xattn.tokens import TokenMap

FILLER = " ".join(["tree"] * 80)  # 80 one-token words, no comma: chunk 1 is full, chunk 2 starts with 5 of them
SOURCE = FILLER + " a red circle"
TARGET = FILLER + " a green circle"
FAST = dict(steps=3, guidance=5.0, seed=3)


def plain_long(pipe, prompt, seed=3, steps=3, guidance=5.0):
    """The plain long-prompt sample (``xattn generate``'s), as the final latent."""
    return pipe(**prompt_kwargs(pipe, [prompt]), num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def run_batch(pipe, controllers, *observers, prompts=(SOURCE, TARGET), steps=3):
    """The edit batch by hand: the long-prompt embeddings, one latent, the controllers then the observers."""
    tokenizer = prompt_tokenizer(pipe, list(prompts))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent = initial_latent(pipe, 3, size, size).repeat(len(prompts), 1, 1, 1)
    with xattn.hooks(pipe, *controllers, *observers, prompts=list(prompts), tokenizer=tokenizer):
        return pipe(**prompt_kwargs(pipe, list(prompts)), latents=latent, num_inference_steps=steps,
                    guidance_scale=5.0, output_type="latent").images


def test_token_maps_and_the_mapper_span_both_chunks(sd1_pipe):
    tokenizer = prompt_tokenizer(sd1_pipe, [SOURCE, TARGET])
    source, target = TokenMap(tokenizer, SOURCE), TokenMap(tokenizer, TARGET)
    assert source.max_length == target.max_length == 154
    assert source.indices("red") == target.indices("green") == [84]  # chunk 2: slot 77 + 1 + 5 trees + "a"
    mapper = replace_mapper(source, target)
    assert torch.allclose(mapper.matrix, torch.eye(154, dtype=torch.float64), atol=1e-12)  # one piece for one: every slot to itself
    longer = TokenMap(tokenizer, FILLER + " a fuchsia circle")  # 'fuchsia' is two pieces
    stretched = replace_mapper(source, longer)
    fuchsia = longer.indices("fuchsia")
    assert fuchsia == [84, 85] and stretched.sources_of(84) == stretched.sources_of(85) == [84]
    assert stretched.sources_of(77) == [77] and stretched.sources_of(0) == [0]  # each chunk's start
    assert stretched.sources_of(longer.end_slot) == [source.end_slot]
    assert stretched.sources_of(76) == [76]  # chunk 1's end token (its 75 tokens are full)
    assert torch.allclose(stretched.matrix.sum(dim=1), torch.ones(154, dtype=torch.float64))  # no attention lost
    # A word cut by chunk 1's end: its pieces lie at slot 75 and, after chunk 2's start, at 78.
    cut_source = TokenMap(tokenizer, " ".join(["tree"] * 74) + " red circle")
    cut_target = TokenMap(tokenizer, " ".join(["tree"] * 74) + " fuchsia circle")
    assert cut_target.indices("fuchsia") == [75, 78] and cut_source.indices("red") == [75]
    cut = replace_mapper(cut_source, cut_target)
    assert cut.sources_of(75) == cut.sources_of(78) == [75]
    assert cut.sources_of(76) == [76] and cut.sources_of(77) == [77]  # chunk 1's end, chunk 2's start
    assert cut.sources_of(79) == [78]  # 'circle'
    assert torch.allclose(cut.matrix.sum(dim=1), torch.ones(154, dtype=torch.float64))


def test_source_row_is_the_plain_long_sample_and_an_empty_window_the_plain_target(sd1_pipe):
    result = edit(sd1_pipe, SOURCE, TARGET, output_type="latent", **FAST)
    assert (result.source - plain_long(sd1_pipe, SOURCE)).abs().max() <= 1e-4
    assert (result.reprompts[0] - plain_long(sd1_pipe, TARGET)).abs().max() <= 1e-4
    assert (result.targets[0] - result.reprompts[0]).abs().max() > 1e-2  # the edit changed the target
    assert result.settings["chunks"] == [2, 2]
    empty = edit(sd1_pipe, SOURCE, TARGET, cross_steps=None, self_steps=None, reprompt=False, output_type="latent",
                 **FAST)
    assert (empty.targets[0] - plain_long(sd1_pipe, TARGET)).abs().max() <= 1e-4


def test_a_full_replace_window_gives_the_target_the_sources_maps_on_every_slot(sd1_pipe):
    seen = []

    def compare(p, ctx):
        source = ctx.layout.row_indices(cond=True, prompt=0)[0]
        target = ctx.layout.row_indices(cond=True, prompt=1)[0]
        seen.append((p.shape[-1], (p[target] - p[source]).abs().max().item()))

    controllers = build_controllers(prompt_tokenizer(sd1_pipe, [SOURCE, TARGET]), SOURCE, [TARGET], mode="replace",
                                    cross_steps="0:1", self_steps=None)
    run_batch(sd1_pipe, controllers, xattn.Hook("probs", compare, selector="kind=cross steps=0:1"))
    assert seen and all(columns == 154 for columns, _ in seen)
    assert max(difference for _, difference in seen) <= 1e-6


def test_capture_finds_the_chunk_two_word_during_the_edit(sd1_pipe):
    tokenizer = prompt_tokenizer(sd1_pipe, [SOURCE, TARGET])
    capture = Capture()
    run_batch(sd1_pipe, build_controllers(tokenizer, SOURCE, [TARGET], self_steps=None), capture)
    assert min(TokenMap(tokenizer, TARGET).indices("green")) >= 77
    green = capture.maps().word("green", prompt=1)
    assert green.ndim == 2 and torch.isfinite(green).all() and green.abs().sum() > 0


def test_a_weighted_chunk_two_word_is_reweighted_as_an_explicit_probs_hook(sd1_pipe):
    source, targets, weights = prompt_weights(SOURCE, [FILLER + " a (green:1.5) circle"], "a1111")
    assert (source, targets, weights) == (SOURCE, [TARGET], {"green": 1.5})
    tokenizer = prompt_tokenizer(sd1_pipe, [source, *targets])
    green = TokenMap(tokenizer, TARGET).indices("green")
    assert min(green) >= 77
    weighted = run_batch(sd1_pipe, build_controllers(tokenizer, source, targets, mode="replace", cross_steps="0:1",
                                                     self_steps=None, reweight=weights))

    def scale(p, ctx):
        for row in ctx.layout.row_indices(cond=True, prompt=1):
            p[row, :, :, green] *= 1.5
        return p

    edit_only = build_controllers(tokenizer, source, targets, mode="replace", cross_steps="0:1", self_steps=None)
    reference = run_batch(sd1_pipe, edit_only, xattn.Hook("probs", scale, selector="kind=cross"))
    plain = run_batch(sd1_pipe, build_controllers(tokenizer, source, targets, mode="replace", cross_steps="0:1",
                                                  self_steps=None))
    assert (weighted - reference).abs().max() <= 1e-4
    assert (weighted[1] - plain[1]).abs().max() > 1e-3  # the weight changed the target
    assert (weighted[0] - plain[0]).abs().max() <= 1e-5  # and left the source alone


def test_a_target_with_more_chunks_than_the_source_is_refused(sd1_pipe):
    tokenizer = prompt_tokenizer(sd1_pipe, ["a red circle", SOURCE])
    with pytest.raises(EditError, match="fills 2 chunks of 75 tokens and the source 'a red circle' 1: the chunks "
                                        "cannot be aligned"):
        build_controllers(tokenizer, "a red circle", [SOURCE], mode="refine")
    shorter = build_controllers(tokenizer, SOURCE, ["a green circle"], mode="refine", self_steps=None)
    assert shorter  # a target with fewer chunks is padded with empty ones


def test_cli_edits_long_prompts_with_break_and_a_weighted_chunk_two_word(cli, sd1_path, tmp_path):
    source = SOURCE + " BREAK a blue square"
    target = FILLER + " a (green:1.5) circle BREAK a blue square"
    result = cli("edit", "--source", source, "--target", target, "--steps", 2, "--self-steps", "none",
                 "--blend", "none", "--model", sd1_path, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["manifest.json", "reprompt.png", "sheet.png", "source.png", "target.png"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["prompt_weights"] == {"green": 1.5}
    assert manifest["edit"]["targets"] == [TARGET + " BREAK a blue square"]
    assert manifest["edit"]["chunks"] == [3, 3]
    reweights = [c for c in manifest["edit"]["controllers"] if "edit" not in c]
    assert len(reweights) == 1 and "green" in json.dumps(reweights[0])


def test_cli_refuses_a_target_whose_chunks_cannot_be_aligned(cli, sd1_path, tmp_path):
    result = cli("edit", "--source", "a red circle", "--target", TARGET, "--steps", 2, "--model", sd1_path,
                 "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "cannot be aligned" in result.output and "fills 2 chunks" in result.output


def test_sdxl_edits_long_prompts_on_the_same_path(sdxl_pipe):
    result = edit(sdxl_pipe, SOURCE, TARGET, self_res="<=16", output_type="latent", **FAST)
    assert result.settings["chunks"] == [2, 2]
    assert (result.source - plain_long(sdxl_pipe, SOURCE)).abs().max() <= 1e-4
    assert (result.reprompts[0] - plain_long(sdxl_pipe, TARGET)).abs().max() <= 1e-4
    assert (result.targets[0] - result.reprompts[0]).abs().max() > 1e-3
