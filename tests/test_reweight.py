"""Reweight: fused modes against float64 attention written out by hand, scope, schedules, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tiny_models
import xattn
from xattn.capture import Capture
from xattn.hookpoints import BatchLayout, Row
from xattn.prompt_syntax import PromptSyntaxError
from xattn.reweight import Ramp, Reweight, ReweightError

PROMPTS = ("a red circle and a blue square", "a green square and a red triangle")
# Slots written out by hand (slot 0 is the start token; every word here is one BPE piece).
SLOTS = ({"red": 2, "circle": 3, "blue": 6, "square": 7}, {"green": 2, "square": 3, "red": 6, "triangle": 7})
TIMESTEP = 501


def test_prompts_have_one_token_per_word():
    tokenizer = tiny_models.tokenizer()
    for prompt, slots in zip(PROMPTS, SLOTS):
        pieces = tokenizer.tokenize(prompt)
        assert len(pieces) == len(prompt.split())
        for word, slot in slots.items():
            assert pieces[slot - 1].removesuffix("</w>") == word


# -- float64 reference ----------------------------------------------------------

def _layout() -> BatchLayout:
    """Three rows: the unconditional row, then one conditional row per prompt."""
    tokenizer = tiny_models.tokenizer()
    return BatchLayout(rows=(Row(False, 0, 0), Row(True, 0, 0), Row(True, 1, 0)), prompts=PROMPTS,
                       token_maps=tuple(xattn.TokenMap(tokenizer, p) for p in PROMPTS))


def _expected_weights(words: dict, rows: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """[3, 77] float64 weights from the hand-written slots; unlisted rows keep 1."""
    weights = torch.ones(3, 77, dtype=torch.float64)
    for row in rows:
        for word, value in words.items():
            slot = word if isinstance(word, int) else SLOTS[row - 1][word]
            weights[row, slot] = value
    return weights


def _reference_site(attn, hidden, context, weights, mode):
    """One cross-attention module's output in float64, reweighted the way ``mode`` defines it."""
    assert attn.group_norm is None and attn.spatial_norm is None and not attn.norm_cross
    assert not attn.residual_connection and attn.rescale_output_factor == 1.0 and attn.norm_q is None

    def linear(layer, x):
        return F.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double())

    x, e = hidden.double(), context.double()  # [b, i, c], [b, j, d]
    if mode == "embedding":  # scale token rows, then restore each row's mean (A1111)
        scaled = e * weights[:, :, None]
        e = scaled * (e.mean(dim=(1, 2)) / scaled.mean(dim=(1, 2)))[:, None, None]
    q, k, v = linear(attn.to_q, x), linear(attn.to_k, e), linear(attn.to_v, e)
    b, heads = q.shape[0], attn.heads
    d = q.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # [b, h, n, d]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [b, h, i, j]
    w = weights[:, None, None, :]
    if mode == "scale":
        probs = probs * w
    elif mode == "bias":
        probs = probs * w / (probs * w).sum(dim=-1, keepdim=True)
    out = (probs @ v).transpose(1, 2).reshape(b, -1, heads * d)
    return linear(attn.to_out[0], out)


def _run_recording_cross_sites(unet, controller, layout, seed=0):
    """Run the UNet once under ``controller``; return {site: (module, hidden, context, output)}."""
    generator = torch.Generator().manual_seed(seed)
    batch, config = layout.batch_size, unet.config
    kwargs = {}
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text_dim, generator=generator),
                                       "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * batch, dtype=torch.float32)}
    sample = torch.randn(batch, config.in_channels, 16, 16, generator=generator)
    text = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    modules = dict(unet.named_modules())
    records, handles = {}, []
    for site in xattn.sites(unet):
        if site.kind != "cross":
            continue

        def keep(module, args, kwargs, output, name=site.name):
            hidden = args[0] if args else kwargs["hidden_states"]
            records[name] = (module, hidden, kwargs["encoder_hidden_states"], output)

        handles.append(modules[site.name].register_forward_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad(), xattn.hooks(unet, controller, layout=layout):
            unet(sample, torch.tensor(TIMESTEP), text, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert records, "the model has cross-attention sites"
    return records


@pytest.mark.parametrize(("mode", "words"), [
    ("scale", {"red": 2.5, "square": 0.0, 9: -0.75}),
    ("bias", {"red": 3.0, "square": 0.2, 9: 0.5}),
    ("embedding", {"red": 1.8, "square": 0.3, 9: 0.0}),
])
def test_fused_modes_equal_float64_reference_per_row_and_token(any_pipe, mode, words):
    """Per-token weights that land on different slots in each row; the unconditional row keeps 1."""
    records = _run_recording_cross_sites(any_pipe.unet, Reweight(words, mode=mode), _layout())
    weights = _expected_weights(words)
    for name, (module, hidden, context, output) in records.items():
        expected = _reference_site(module, hidden, context, weights, mode)
        unweighted = _reference_site(module, hidden, context, torch.ones_like(weights), "scale")
        assert (output.double() - expected).abs().max().item() <= 2e-5, name
        # the weights really changed the conditional rows, and only them
        assert (expected[1:] - unweighted[1:]).abs().max().item() > 1e-4, name
        assert (output[0].double() - unweighted[0]).abs().max().item() <= 2e-5, name


def test_rows_all_weights_the_unconditional_row_too(sd1_pipe):
    # slot 5 in every row, including the unconditional one
    records = _run_recording_cross_sites(sd1_pipe.unet, Reweight({5: 0.25}, mode="bias", rows="all"), _layout())
    weights = _expected_weights({5: 0.25}, rows=(0, 1, 2))
    for name, (module, hidden, context, output) in records.items():
        expected = _reference_site(module, hidden, context, weights, "bias")
        assert (output.double() - expected).abs().max().item() <= 2e-5, name


def test_prompt_index_weights_one_prompt_only(sd1_pipe):
    records = _run_recording_cross_sites(sd1_pipe.unet, Reweight({"red": 0.0}, prompt_index=1), _layout())
    weights = _expected_weights({"red": 0.0}, rows=(2,))
    for name, (module, hidden, context, output) in records.items():
        assert (output.double() - _reference_site(module, hidden, context, weights, "scale")).abs().max() <= 2e-5


def test_fused_modes_never_materialise_the_map(sd1_pipe, monkeypatch):
    """Every cross site still runs SDPA (the explicit path would not), with weights active."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    cross = [s for s in xattn.sites(sd1_pipe.unet) if s.kind == "cross"]
    for mode in ("scale", "bias", "embedding"):
        calls.clear()
        _run_recording_cross_sites(sd1_pipe.unet, Reweight({"red": 0.5}, mode=mode), _layout())
        assert len(calls) == len(xattn.sites(sd1_pipe.unet)) >= len(cross)


# -- through a pipeline: schedules, scope, composition ------------------------------

def _observed_weights(pipe, controller, prompt="a red circle", steps=4, point="value_scale", selector="kind=cross"):
    """Run the pipeline; return {(step, site): [b, 77] tensor} seen at ``point`` after ``controller``."""
    seen = {}
    observe = xattn.Hook(point, lambda x, ctx: seen.__setitem__((ctx.step, ctx.site.name), x.clone()), selector)
    with xattn.hooks(pipe, controller, observe):
        pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, height=32, width=32,
             generator=torch.Generator().manual_seed(0), output_type="latent")
    return seen


def _uncond_cond(pipe, prompt="a red circle"):
    """Which of the two CFG rows is conditional, read from the session's layout (not assumed)."""
    rows = {}
    probe = xattn.Hook("value_scale", lambda x, ctx: rows.update(rows=ctx.layout.rows), "kind=cross")
    with xattn.hooks(pipe, probe):
        pipe(prompt, num_inference_steps=1, guidance_scale=5.0, height=32, width=32, output_type="latent")
    cond = [i for i, row in enumerate(rows["rows"]) if row.cond]
    uncond = [i for i, row in enumerate(rows["rows"]) if not row.cond]
    return uncond[0], cond[0]


def test_step_window_by_fraction_and_ramp(sd1_pipe):
    uncond, cond = _uncond_cond(sd1_pipe)
    seen = _observed_weights(sd1_pipe, Reweight({"red": Ramp(2.0, 0.5)}, steps="0.25:1"))
    # 4 steps; the window holds steps 1, 2, 3, over which the ramp goes 2.0 -> 1.25 -> 0.5.
    expected = {0: 1.0, 1: 2.0, 2: 1.25, 3: 0.5}
    assert {step for step, _ in seen} == set(expected)
    for (step, site), weights in seen.items():
        assert weights[cond, 2].item() == pytest.approx(expected[step]), (step, site)
        assert torch.all(weights[uncond] == 1.0)
        others = torch.cat([weights[cond, :2], weights[cond, 3:]])
        assert torch.all(others == 1.0)


def test_from_dict_rebuilds_a_controller_that_weights_the_same(sd1_pipe):
    original = Reweight({"red": Ramp(2.0, 0.5), 3: 0.25}, mode="scale", steps="0.25:1", rows="all",
                        selector="res=8")
    rebuilt = Reweight.from_dict(original.to_dict())
    assert rebuilt.to_dict() == original.to_dict()
    expected, got = _observed_weights(sd1_pipe, original), _observed_weights(sd1_pipe, rebuilt)
    assert got.keys() == expected.keys()
    assert any(not torch.all(weights == 1.0) for weights in expected.values())  # the weights did act
    for key, weights in expected.items():
        assert torch.equal(got[key], weights), key


def test_step_window_by_indices_in_bias_mode(sd1_pipe):
    _, cond = _uncond_cond(sd1_pipe)
    seen = _observed_weights(sd1_pipe, Reweight({"circle": 0.5}, mode="bias", steps="0:2"), point="logit_bias")
    for (step, _), bias in seen.items():
        assert bias[cond, 3].item() == pytest.approx(math.log(0.5) if step < 2 else 0.0, abs=1e-6)


def test_selector_limits_the_sites(sd1_pipe):
    cross = [s for s in xattn.sites(sd1_pipe.unet) if s.kind == "cross"]
    seen = _observed_weights(sd1_pipe, Reweight({"red": 0.0}, selector="res=16"), steps=1)
    resolutions = {}
    res_probe = xattn.Hook("value_scale", lambda x, ctx: resolutions.__setitem__(ctx.site.name, max(ctx.res)), "kind=cross")
    with xattn.hooks(sd1_pipe, res_probe):
        sd1_pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="latent")
    assert len(resolutions) == len(cross) and 16 in resolutions.values() and len(set(resolutions.values())) > 1
    _, cond = _uncond_cond(sd1_pipe)
    for (_, site), weights in seen.items():
        assert weights[cond, 2].item() == (0.0 if resolutions[site] == 16 else 1.0), site


def test_capture_in_the_same_session_sees_the_reweighted_maps(sd1_pipe):
    """probs / softmax(scores) at the word's slot is the weight, in the conditional row only."""
    uncond, cond = _uncond_cond(sd1_pipe)
    scores, probs = {}, {}
    keep_scores = xattn.Hook("scores", lambda x, ctx: scores.__setitem__((ctx.step, ctx.site.name), x.double()), "kind=cross")
    keep_probs = xattn.Hook("probs", lambda x, ctx: probs.__setitem__((ctx.step, ctx.site.name), x.double()), "kind=cross")
    with xattn.hooks(sd1_pipe, Reweight({"red": 3.0}), keep_scores, keep_probs):
        sd1_pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="latent")
    assert probs and probs.keys() == scores.keys()
    for key, p in probs.items():
        ratio = p / torch.softmax(scores[key], dim=-1)  # [b, h, i, j]
        assert torch.allclose(ratio[cond, :, :, 2], torch.full_like(ratio[cond, :, :, 2], 3.0), rtol=1e-4)
        assert torch.allclose(ratio[uncond], torch.ones_like(ratio[uncond]), rtol=1e-4)
        assert torch.allclose(ratio[cond, :, :, 3], torch.ones_like(ratio[cond, :, :, 3]), rtol=1e-4)


# -- weighted prompts ---------------------------------------------------------------

def test_from_prompt_weights_the_marked_occurrence_only(sd1_pipe):
    reweight = Reweight.from_prompt("a red circle and a (red:0.5) square")
    assert reweight.prompt == "a red circle and a red square"
    _, cond = _uncond_cond(sd1_pipe, reweight.prompt)
    seen = _observed_weights(sd1_pipe, reweight, prompt=reweight.prompt, steps=1)
    for weights in seen.values():
        assert weights[cond, 2].item() == 1.0  # the first "red"
        assert weights[cond, 6].item() == 0.5  # the second


def test_from_prompt_extra_weights_override(sd1_pipe):
    reweight = Reweight.from_prompt("a (red:2) circle and a [blue] square", weights={"red": 0.25})
    _, cond = _uncond_cond(sd1_pipe, reweight.prompt)
    seen = _observed_weights(sd1_pipe, reweight, prompt=reweight.prompt, steps=1)
    for weights in seen.values():
        assert weights[cond, 2].item() == 0.25
        assert weights[cond, 6].item() == pytest.approx(1 / 1.1)


def test_from_prompt_refuses_a_different_pipeline_prompt(sd1_pipe):
    reweight = Reweight.from_prompt("a (red:2) circle")
    with xattn.hooks(sd1_pipe, reweight), pytest.raises(ReweightError, match="reweight.prompt"):
        sd1_pipe("a (red:2) circle", num_inference_steps=1, height=32, width=32, output_type="latent")


def test_from_prompt_syntax_errors_come_from_the_parser():
    assert Reweight.from_prompt("a (red:2 circle").prompt == "a red:2 circle"  # A1111 reads it: ( runs to the end
    with pytest.raises(PromptSyntaxError):
        Reweight.from_prompt("a (red:2 circle", strict=True)


# -- errors ---------------------------------------------------------------------------

def test_unknown_word_raises_at_the_first_call_naming_the_words(sd1_pipe):
    finished_steps = []

    def on_step_end(pipe, step, timestep, kwargs):
        finished_steps.append(step)
        return kwargs

    # A window that starts late must not delay the check.
    with xattn.hooks(sd1_pipe, Reweight({"purple": 2.0}, steps="0.5:1")):
        with pytest.raises(xattn.TokenError) as error:
            sd1_pipe("a red circle", num_inference_steps=4, height=32, width=32, output_type="latent",
                     callback_on_step_end=on_step_end)
    message = str(error.value)
    assert "'purple'" in message and "'red'" in message and "'circle'" in message
    assert finished_steps == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "2", None])
def test_non_finite_weight_is_refused_naming_word_and_value(value):
    with pytest.raises(ReweightError, match=r"weight of 'red' is "):
        Reweight({"red": value})


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_bias_mode_needs_positive_weights(value):
    with pytest.raises(ReweightError, match=rf"weight of 'blue' is {value}.*bias"):
        Reweight({"red": 2.0, "blue": value}, mode="bias")
    with pytest.raises(ReweightError, match="'blue'"):
        Reweight.from_prompt(f"a red circle and a (blue:{value}) square", mode="bias")
    with pytest.raises(ReweightError, match="ramp end"):
        Reweight({"blue": Ramp(1.0, value)}, mode="bias")
    Reweight({"blue": value}, mode="scale")  # scale mode takes it


def test_bad_options_are_refused():
    with pytest.raises(ReweightError, match="scale, bias, embedding"):
        Reweight({"red": 2.0}, mode="multiply")
    with pytest.raises(ReweightError, match="cross"):
        Reweight({"red": 2.0}, selector="kind=self")
    with pytest.raises(ReweightError, match="once"):
        Reweight({"red": 2.0}, steps="0:0.5", selector="steps=0:2")
    with pytest.raises(ReweightError, match="rows"):
        Reweight({"red": 2.0}, rows="uncond")
    with pytest.raises(ReweightError, match="ramp start"):
        Reweight({"red": Ramp(float("nan"), 1.0)})
    with pytest.raises(ReweightError, match="outside 0..1"):
        Reweight({"red": 2.0}, steps="0:1.5")


def test_token_index_outside_the_sequence_is_refused(sd1_pipe):
    with xattn.hooks(sd1_pipe, Reweight({80: 2.0})), pytest.raises(ReweightError, match="outside 0..76"):
        sd1_pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="latent")


def test_reset_between_runs_resolves_the_new_prompt(sd1_pipe):
    reweight = Reweight({"red": 0.5})
    _observed_weights(sd1_pipe, reweight, prompt="a red circle", steps=1)
    _, cond = _uncond_cond(sd1_pipe, "a big red circle")
    seen = _observed_weights(sd1_pipe, reweight, prompt="a big red circle", steps=1)
    for weights in seen.values():
        assert weights[cond, 3].item() == 0.5 and weights[cond, 2].item() == 1.0


def test_xattn_capture_in_the_same_session_shows_the_change(sd1_pipe):
    """One step from the same noise: the captured 'red' map is the weight times the plain one.

    Only at the first cross site, whose input the reweighting cannot have changed yet.
    """
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert first in {s.name for s in xattn.sites(sd1_pipe.unet) if s.kind == "cross"}

    def captured(*controllers):
        capture = Capture(f"sites={first}")
        with xattn.hooks(sd1_pipe, capture, *controllers):  # capture first: order does not matter
            sd1_pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="latent",
                     generator=torch.Generator().manual_seed(0))
        maps = capture.maps()
        return {word: maps.word(word, normalize=False).double() for word in ("red", "circle")}

    plain, weighted = captured(), captured(Reweight({"red": 3.0}))
    assert plain["red"].abs().max() > 0
    assert torch.allclose(weighted["red"], 3.0 * plain["red"], rtol=1e-4, atol=1e-7)
    assert torch.allclose(weighted["circle"], plain["circle"], rtol=1e-4, atol=1e-7)


def _final_norm(encoder) -> str:
    names = [name for name, _ in encoder.named_modules() if name.endswith("final_layer_norm")]
    assert len(names) == 1, names
    return names[0]


def test_embedding_mode_equals_emphasising_the_prompt_embeddings_once(sd1_pipe):
    """A1111's emphasis done by hand on the encoder output, in float64, gives the same latents."""
    prompt, weight = "a red circle", 1.7
    with torch.no_grad():  # a trained encoder's final norm has a bias, so rows do not average to 0
        dict(sd1_pipe.text_encoder.named_modules())[_final_norm(sd1_pipe.text_encoder)].bias.fill_(0.5)
    cond, uncond = sd1_pipe.encode_prompt(prompt, "cpu", 1, True)
    e = cond.double()
    scaled = e.clone()
    scaled[:, 2] *= weight  # "red" is slot 2
    emphasised = (scaled * (e.mean() / scaled.mean())).float()  # one row: the batch mean is the row mean
    common = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="latent")
    by_hand = sd1_pipe(prompt_embeds=emphasised, negative_prompt_embeds=uncond,
                       generator=torch.Generator().manual_seed(0), **common).images
    with xattn.hooks(sd1_pipe, Reweight({"red": weight}, mode="embedding")):
        ours = sd1_pipe(prompt, generator=torch.Generator().manual_seed(0), **common).images
    plain = sd1_pipe(prompt, generator=torch.Generator().manual_seed(0), **common).images
    assert (ours - by_hand).abs().max().item() <= 1e-4
    assert (ours - plain).abs().max().item() > 1e-3


def test_embedding_mode_refuses_rows_that_average_to_zero(sd1_pipe):
    """The tiny encoder's final layer norm has no bias: every row's mean is ~0, so no mean to restore."""
    with xattn.hooks(sd1_pipe, Reweight({"red": 2.0}, mode="embedding")), pytest.raises(
            ReweightError, match="average to about 0.*'scale' or 'bias'"):
        sd1_pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="latent")


def test_sdxl_pipeline_weights_the_word_in_the_conditional_rows(sdxl_pipe):
    uncond, cond = _uncond_cond(sdxl_pipe)
    seen = _observed_weights(sdxl_pipe, Reweight({"red": 0.0}), steps=2)
    assert seen
    for weights in seen.values():
        assert weights[cond, 2].item() == 0.0 and torch.all(weights[uncond] == 1.0)
