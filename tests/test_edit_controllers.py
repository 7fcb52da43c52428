"""Edit controllers replace exactly the maps, rows and steps they should.

Each test samples a tiny SD 1.x pipeline for four DDIM steps with guidance, so
the UNet batch is [uncond src, uncond tgt, cond src, cond tgt] (diffusers
concatenates negative then positive embeddings). Observers before and after
the edit see every attention map; references are float64 attention written
out from the module weights and the source row's recorded inputs.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import xattn
import xattn.processor as processor_module
from xattn.edit import EditError, Refine, Replace, SelfInject, edit_layout
from xattn.reweight import Reweight
from reference import reference_probs

STEPS = 4
UNCOND_SRC, UNCOND_TGT, COND_SRC, COND_TGT = 0, 1, 2, 3


class Observed:
    """Maps before and after the edit per (site, step), and each site's inputs per step."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.maps = defaultdict(dict)
        self.inputs = defaultdict(list)  # site -> [(hidden, context)] one per UNet call (= step under DDIM)
        self.kind = {}

    def hook(self, when):
        def keep(p, ctx):
            self.maps[(ctx.site.name, ctx.step)][when] = p.detach().clone()
            self.kind[ctx.site.name] = (ctx.kind, ctx.res)
        return xattn.Hook("probs", keep, selector="kind=all")

    def run(self, prompts, *controllers):
        modules = dict(self.pipe.unet.named_modules())
        handles = []
        for site in xattn.sites(self.pipe):
            def pre(module, args, kwargs, name=site.name):
                hidden = args[0] if args else kwargs["hidden_states"]
                self.inputs[name].append((hidden, kwargs.get("encoder_hidden_states")))
            handles.append(modules[site.name].register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with xattn.hooks(self.pipe, self.hook("before"), *controllers, self.hook("after")):
                self.pipe(prompts, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                          generator=torch.Generator().manual_seed(0))
        finally:
            for handle in handles:
                handle.remove()
        return self

    def touched(self, site, step):
        seen = self.maps[(site, step)]
        return [r for r in range(seen["before"].shape[0]) if not torch.equal(seen["before"][r], seen["after"][r])]

    def source_reference(self, site, step, row=COND_SRC):
        module = dict(self.pipe.unet.named_modules())[site]
        hidden, context = self.inputs[site][step]
        return reference_probs(module, hidden[row:row + 1], None if context is None else context[row:row + 1])[0]


def cross_sites(observed):
    return [name for name, (kind, _) in observed.kind.items() if kind == "cross"]


def self_sites(observed):
    return [name for name, (kind, _) in observed.kind.items() if kind == "self"]


def test_replace_touches_only_the_conditional_target_rows_at_window_steps(sd1_pipe):
    seen = Observed(sd1_pipe).run(["a red circle", "a green circle"], Replace(steps="1:3"))
    for site in cross_sites(seen):
        for step in range(STEPS):
            assert seen.touched(site, step) == ([COND_TGT] if step in (1, 2) else []), (site, step)
    for site in self_sites(seen):
        for step in range(STEPS):
            assert seen.touched(site, step) == []


def test_rows_all_also_edits_the_unconditional_target_row(sd1_pipe):
    seen = Observed(sd1_pipe).run(["a red circle", "a green circle"], Replace(steps="0:1", rows="all"))
    for site in cross_sites(seen):
        assert seen.touched(site, 0) == [UNCOND_TGT, COND_TGT]
        assert seen.touched(site, 1) == []


def test_replace_with_a_three_piece_word_matches_float64_reference(sd1_pipe):
    # "circle" (1 piece, slot 3) -> "skyscraper" (3 pieces, slots 3..5); end token 4 -> 6
    seen = Observed(sd1_pipe).run(["a red circle", "a red skyscraper"], Replace(steps="0:2"))
    for site in cross_sites(seen):
        for step in (0, 1):
            got = seen.maps[(site, step)]["after"][COND_TGT].double()  # [h, i, j]
            ref = seen.source_reference(site, step)
            for t, s in ((0, 0), (1, 1), (2, 2), (6, 4)):
                assert (got[..., t] - ref[..., s]).abs().max() <= 1e-5, (site, t)
            for t in (3, 4, 5):
                assert (got[..., t] - ref[..., 3] / 3).abs().max() <= 1e-5, (site, t)
            # the padding's attention is moved, not lost: both pad blocks carry the same total
            assert (got[..., 7:].sum(-1) - ref[..., 5:].sum(-1)).abs().max() <= 1e-5
            assert (got.sum(-1) - 1).abs().max() <= 1e-5  # still a distribution


def test_refine_keeps_the_new_word_and_maps_the_shared_ones(sd1_pipe):
    seen = Observed(sd1_pipe).run(["a red circle", "a big red circle"], Refine(steps="0:1"))
    for site in cross_sites(seen):
        maps = seen.maps[(site, 0)]
        got = maps["after"][COND_TGT].double()
        ref = seen.source_reference(site, 0)
        own = seen.source_reference(site, 0, row=COND_TGT)  # the target's own attention
        assert (got[..., 2] - own[..., 2]).abs().max() <= 1e-5  # "big" keeps its own
        for t, s in ((0, 0), (1, 1), (3, 2), (4, 3), (5, 4)):
            assert (got[..., t] - ref[..., s]).abs().max() <= 1e-5, (site, t, s)


def test_per_word_window_lets_a_word_go_earlier(sd1_pipe):
    controller = Replace(steps={"default": "0:4", "circle": "0:1"})
    seen = Observed(sd1_pipe).run(["a red circle", "a green circle"], controller)
    for site in cross_sites(seen):
        for step in (0, 2):
            maps = seen.maps[(site, step)]
            after, before = maps["after"][COND_TGT], maps["before"][COND_TGT]
            circle_replaced = not torch.equal(after[..., 3], before[..., 3])
            green_replaced = not torch.equal(after[..., 2], before[..., 2])
            assert green_replaced, (site, step)
            assert circle_replaced == (step == 0), (site, step)


def test_reweight_before_replace_scales_the_replaced_map(sd1_pipe):
    equalizer = Reweight({"green": 2.0}, mode="scale", prompt_index=1)
    seen = Observed(sd1_pipe).run(["a red circle", "a green circle"], equalizer, Replace(steps="0:1"))
    for site in cross_sites(seen):
        got = seen.maps[(site, 0)]["after"][COND_TGT].double()
        ref = seen.source_reference(site, 0)
        assert (got[..., 2] - 2 * ref[..., 2]).abs().max() <= 1e-5
        assert (got[..., 3] - ref[..., 3]).abs().max() <= 1e-5
        assert seen.touched(site, 0) == [COND_TGT]  # the source row is neither weighted nor replaced


def test_reweight_after_the_edit_is_refused(sd1_pipe):
    with pytest.raises(EditError, match="put token weights .*before the edit"):
        with xattn.hooks(sd1_pipe, Replace(), Reweight({"green": 2.0}, prompt_index=1)):
            pass
    assert not any(type(p).__name__ == "XattnProcessor" for p in sd1_pipe.unet.attn_processors.values())


def test_self_inject_gives_targets_the_source_map_only_at_chosen_resolutions_and_steps(sd1_pipe):
    # Observers see the map each row attended with; compare with float64 attention from recorded inputs.
    seen = Observed(sd1_pipe).run(["a red circle", "a green circle"], SelfInject(steps="0:2", res="<=8"))
    injected = 0
    for site in self_sites(seen):
        small = max(seen.kind[site][1]) <= 8
        for step in range(STEPS):
            got = seen.maps[(site, step)]["after"].double()
            lender = COND_SRC if (small and step < 2) else COND_TGT
            assert (got[COND_TGT] - seen.source_reference(site, step, row=lender)).abs().max() <= 1e-5, (site, step)
            for row in (UNCOND_SRC, UNCOND_TGT, COND_SRC):
                assert (got[row] - seen.source_reference(site, step, row=row)).abs().max() <= 1e-5, (site, row)
            injected += lender == COND_SRC
    assert injected == 2 * 4  # tiny SD 1.x: 4 self sites at 8x8 or 4x4 (down 1, up 1 twice, mid), 2 steps
    for site in cross_sites(seen):
        assert all(seen.touched(site, step) == [] for step in range(STEPS))


def test_fused_self_injection_equals_copying_the_source_map(sd1_pipe):
    # prompt-to-prompt's way, as a reference: compute the self-attention map and copy the source row's.
    def copy_source_map(p, ctx):
        p = p.clone()
        p[COND_TGT] = p[COND_SRC]
        return p

    def sample(*controllers):
        with xattn.hooks(sd1_pipe, *controllers):
            return sd1_pipe(["a red circle", "a green circle"], num_inference_steps=STEPS, guidance_scale=5.0,
                            output_type="latent", generator=torch.Generator().manual_seed(0)).images

    fused = sample(SelfInject(steps="0:2", res="<=8"))
    copied = sample(xattn.Hook("probs", copy_source_map, selector="kind=self res=<=8 steps=0:2"))
    plain = sample()
    # float32 over four sampling steps of latents of size ~6: agree to ~1e-6 relative
    assert (fused - copied).abs().max().item() <= 1e-5 * copied.abs().max().item()
    assert (fused[1] - plain[1]).abs().max().item() > 1e-3  # the injection changed the target image


def test_only_edited_sites_and_steps_leave_fused_attention(sd1_pipe, monkeypatch):
    explicit = defaultdict(set)
    original = processor_module._explicit_attention

    def counting(attn, query, key, value, mask, scale, active):
        context = active.context
        explicit[context.step].add((context.site.name, context.kind))
        return original(attn, query, key, value, mask, scale, active)

    monkeypatch.setattr(processor_module, "_explicit_attention", counting)
    with xattn.hooks(sd1_pipe, Replace(steps="0:2"), SelfInject(steps="0:1", res="<=8")):
        sd1_pipe(["a red circle", "a green circle"], num_inference_steps=STEPS, guidance_scale=5.0,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
    all_sites = xattn.sites(sd1_pipe)
    cross = {(s.name, "cross") for s in all_sites if s.kind == "cross"}
    # self-attention injection borrows queries and keys on the fused path: no self site is ever explicit
    assert explicit[0] == cross
    assert explicit[1] == cross
    assert not explicit[2] and not explicit[3]


def test_edit_needs_a_source_and_a_target(sd1_pipe):
    with xattn.hooks(sd1_pipe, Replace()):
        with pytest.raises(EditError, match="source prompt and at least one target"):
            sd1_pipe("a red circle", num_inference_steps=2, output_type="latent")


def test_word_swap_with_different_word_counts_fails_at_the_first_call(sd1_pipe):
    with xattn.hooks(sd1_pipe, Replace()):
        with pytest.raises(EditError, match="same number of words"):
            sd1_pipe(["a red circle", "a big red circle"], num_inference_steps=2, output_type="latent")


@pytest.mark.parametrize("steps, message", [
    (1.5, "fraction of the schedule in 0..1"),
    ("0:2:3", "more than one ':'"),
    (True, "not a step window"),
    ({"default": 0.8, "": 0.4}, "needs a word"),
])
def test_bad_windows_are_refused_with_the_fix(steps, message):
    with pytest.raises(EditError, match=message):
        Replace(steps=steps)


def test_bad_selectors_and_rows_are_refused():
    with pytest.raises(EditError, match="acts on cross-attention"):
        Replace(selector="kind=self")
    with pytest.raises(EditError, match="as `steps=`"):
        Replace(selector="steps=0:3")
    with pytest.raises(EditError, match="rows must be one of cond, all"):
        SelfInject(rows="uncond")
    with pytest.raises(EditError, match="res"):
        SelfInject(res="huge")


def test_per_word_window_for_an_absent_word_is_refused(sd1_pipe):
    with xattn.hooks(sd1_pipe, Replace(steps={"default": 0.8, "hat": 0.2})):
        with pytest.raises(EditError, match="'hat', which is in no target prompt"):
            sd1_pipe(["a red circle", "a green circle"], num_inference_steps=2, output_type="latent")


class _Schedule:
    """Stands in for a scheduler on a bare UNet call: the step clock reads ``timesteps``."""

    def __init__(self, timesteps):
        self.timesteps = torch.tensor(timesteps)


def test_edit_batch_on_a_bare_unet_with_a_given_layout(sd1_pipe):
    """The benchmark's setting: a bare UNet call of [uncond src, uncond tgt, cond src, cond tgt]."""
    unet = sd1_pipe.unet
    layout = edit_layout(sd1_pipe.tokenizer, "a red circle", ["a green circle"])
    assert [(row.cond, row.prompt) for row in layout.rows] == [(False, 0), (False, 1), (True, 0), (True, 1)]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator).expand(4, -1, -1, -1)
    text = torch.randn(4, layout.token_maps[0].max_length, unet.config.cross_attention_dim, generator=generator)
    touched = defaultdict(set)

    def compare(p, ctx):
        touched[(ctx.kind, ctx.step)].update(r for r in range(4) if not torch.equal(p[r], before[ctx.site.name][r]))

    before = {}
    keep = xattn.Hook("probs", lambda p, ctx: before.__setitem__(ctx.site.name, p.clone()), selector="kind=all")
    after = xattn.Hook("probs", compare, selector="kind=cross")
    borrowed = defaultdict(set)  # self-attention injection hands rows the source's queries and keys (fused)

    def lenders(rows, ctx):
        borrowed[(ctx.kind, ctx.step)].update((r, int(s)) for r, s in enumerate(rows) if r != s)

    seen_rows = xattn.Hook("map_rows", lenders, selector="kind=all")
    controllers = (keep, Replace(steps="0:0.8"), SelfInject(steps="0:0.4", res="<=8"), after, seen_rows)
    with xattn.hooks(unet, *controllers, scheduler=_Schedule([999, 500, 1]), layout=layout), torch.no_grad():
        for timestep in (999, 500, 1):  # steps 0, 1, 2 of 3: self window 0:0.4 -> 0, 1; cross 0:0.8 -> 0, 1, 2
            unet(sample, timestep, text)
    assert touched[("cross", 0)] == touched[("cross", 1)] == touched[("cross", 2)] == {3}
    assert borrowed[("self", 0)] == borrowed[("self", 1)] == {(3, 2)} and borrowed[("self", 2)] == set()
    assert not any(pairs for (kind, _), pairs in borrowed.items() if kind == "cross")


def test_each_target_image_is_edited_from_the_source_image_of_the_same_index(sd1_pipe):
    before, after = {}, {}
    keep = xattn.Hook("probs", lambda p, ctx: before.__setitem__((ctx.site.name, ctx.step), p.clone()),
                      selector="kind=cross")
    seen = xattn.Hook("probs", lambda p, ctx: after.__setitem__((ctx.site.name, ctx.step), p.clone()),
                      selector="kind=cross")
    generator = [torch.Generator().manual_seed(s) for s in range(4)]  # two different images per prompt
    with xattn.hooks(sd1_pipe, keep, Replace(steps="0:1"), seen):
        sd1_pipe(["a red circle", "a green circle"], num_images_per_prompt=2, num_inference_steps=2,
                 guidance_scale=5.0, output_type="latent", generator=generator)
    # rows: uncond (src img 0, src img 1, tgt img 0, tgt img 1), then cond in the same order
    for (site, step), probs in after.items():
        if step != 0:
            continue
        original = before[(site, step)]
        assert not torch.equal(original[4], original[5])  # the two images differ
        assert torch.equal(probs[6], original[4]) and torch.equal(probs[7], original[5])  # same words: identity map
        assert all(torch.equal(probs[r], original[r]) for r in range(6))
