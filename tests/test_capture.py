"""Capture keeps exactly what its selector picks, equal to an independent float64 reference."""

from __future__ import annotations

import pytest
import torch

import tiny_models
import xattn
import xattn.processor
from xattn.capture import Capture, CaptureBudgetError
from xattn.tokens import TokenError
from reference import reference_probs

SIZE = 32  # image side: the tiny pipelines' VAE halves it, so latents are 16x16
COND_ROW = 1  # diffusers' SD pipelines stack [unconditional, conditional] under guidance


def run(pipe, *controllers, prompt="a red cat", steps=2, guidance=5.0, **kwargs):
    with xattn.hooks(pipe, *controllers):
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                    generator=torch.Generator().manual_seed(0), **kwargs)


class InputRecorder:
    """Forward pre-hooks that keep every attention module's inputs, call by call."""

    def __init__(self, pipe, site_names):
        modules = dict(pipe.unet.named_modules())
        self.modules = modules
        self.inputs = {name: [] for name in site_names}
        self.handles = [modules[name].register_forward_pre_hook(self._keep(name), with_kwargs=True)
                        for name in site_names]

    def _keep(self, name):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[name].append((hidden.detach().clone(), kwargs.get("encoder_hidden_states")))
        return pre_hook

    def reference(self, name, call):
        hidden, context = self.inputs[name][call]
        return reference_probs(self.modules[name], hidden, context)

    def close(self):
        for handle in self.handles:
            handle.remove()


def in_kept_slots(probs: torch.Tensor, prompt: str = "a red cat") -> torch.Tensor:
    """``[..., 77]`` maps as a default capture keeps them: the start token, the prompt's pieces and its end
    token, then one column with the padding slots summed (the count comes from the tokenizer, not the capture)."""
    kept = len(tiny_models.tokenizer().tokenize(prompt)) + 2
    return torch.cat([probs[..., :kept], probs[..., kept:].sum(dim=-1, keepdim=True)], dim=-1)


def cross_sites(pipe):
    return [site for site in xattn.sites(pipe) if site.kind == "cross"]


# -- exact values ------------------------------------------------------------------------

def test_per_step_maps_equal_float64_reference(any_pipe):
    sites = cross_sites(any_pipe)
    recorder = InputRecorder(any_pipe, [s.name for s in sites])
    capture = Capture(per_step=True, keep_heads=True, storage_dtype=torch.float32)
    try:
        run(any_pipe, capture)
    finally:
        recorder.close()
    layers = {(layer.steps[0], layer.sites[0]): layer for layer in capture.maps().layers}
    assert set(layers) == {(step, s.name) for step in (0, 1) for s in sites}
    for (step, name), layer in layers.items():
        expected = in_kept_slots(recorder.reference(name, step)[COND_ROW])  # [h, i, j']
        assert layer.count == 1
        assert layer.tensor().shape == (1, *expected.shape)
        assert (layer.tensor()[0].double() - expected).abs().max().item() <= 1e-5, (step, name)


def test_aggregated_sums_equal_float64_reference(sd2_pipe):
    sites = cross_sites(sd2_pipe)  # SD 2.x: head counts differ per block, upcast attention
    recorder = InputRecorder(sd2_pipe, [s.name for s in sites])
    capture = Capture()
    try:
        run(sd2_pipe, capture, steps=3)
    finally:
        recorder.close()
    expected: dict[tuple[int, int], torch.Tensor] = {}
    counts: dict[tuple[int, int], int] = {}
    for name, calls in recorder.inputs.items():
        for call in range(len(calls)):
            probs = recorder.reference(name, call)[COND_ROW]  # [h, i, j]
            side = int(probs.shape[1] ** 0.5)
            expected[(side, side)] = expected.get((side, side), 0) + in_kept_slots(probs.mean(dim=0))
            counts[(side, side)] = counts.get((side, side), 0) + 1
    layers = capture.maps().layers
    assert {layer.res for layer in layers} == set(expected)
    for layer in layers:
        assert layer.count == counts[layer.res]
        assert layer.steps == (0, 1, 2)
        assert (layer.tensor()[0, 0].double() - expected[layer.res]).abs().max().item() <= 1e-5


def test_aggregated_sums_equal_sum_of_per_step_maps(sd1_pipe):
    aggregated = Capture()
    per_step = Capture(per_step=True, storage_dtype=torch.float32)
    run(sd1_pipe, aggregated, per_step, steps=4)
    summed: dict[tuple[int, int], torch.Tensor] = {}
    for layer in per_step.maps().layers:
        summed[layer.res] = summed.get(layer.res, 0) + layer.tensor()
    for layer in aggregated.maps().layers:
        assert (layer.tensor() - summed[layer.res]).abs().max().item() <= 1e-5


# -- selection -----------------------------------------------------------------------------

def test_selection_captures_exactly_the_selected_calls(sd1_pipe, monkeypatch):
    every_call = []
    recorder = xattn.Hook("value_scale", lambda x, ctx: every_call.append(ctx), selector="kind=all")
    explicit_calls = []
    original = xattn.processor._explicit_attention

    def counting(attn, query, *args, **kwargs):
        explicit_calls.append(query.shape)
        return original(attn, query, *args, **kwargs)

    monkeypatch.setattr(xattn.processor, "_explicit_attention", counting)
    capture = Capture("sites=up_blocks.* res=8 steps=1:3 heads=0:2", per_step=True, keep_heads=True)
    run(sd1_pipe, capture, recorder, steps=4)

    wanted = [(ctx.site.name, ctx.step) for ctx in every_call
              if ctx.site.kind == "cross" and ctx.site.name.startswith("up_blocks.")
              and ctx.res == (8, 8) and ctx.step in (1, 2)]
    assert wanted and sorted(capture.calls.elements()) == sorted(wanted)
    assert len(explicit_calls) == len(wanted)  # every other site and step kept the fused SDPA path
    for layer in capture.maps().layers:
        assert layer.heads == (0, 1) and layer.tensor().shape[1] == 2


def test_selected_heads_are_the_reference_heads(sd1_pipe):
    name = next(s.name for s in cross_sites(sd1_pipe) if s.name.startswith("down_blocks.0"))
    recorder = InputRecorder(sd1_pipe, [name])
    capture = Capture(f"sites={name} heads=1,3", per_step=True, keep_heads=True, storage_dtype=torch.float32)
    try:
        run(sd1_pipe, capture, steps=1)
    finally:
        recorder.close()
    (layer,) = capture.maps().layers
    expected = in_kept_slots(recorder.reference(name, 0)[COND_ROW][[1, 3]])  # [2, i, j']
    assert (layer.tensor()[0].double() - expected).abs().max().item() <= 1e-5


def test_token_selection_keeps_only_those_slots(sd1_pipe):
    some = Capture("tokens=cat")
    every = Capture()
    run(sd1_pipe, some, every, prompt="a red cat")
    some_maps, every_maps = some.maps(), every.maps()
    assert some_maps.columns == [3]
    assert {layer.tensor().shape[-1] for layer in some_maps.layers} == {1}
    assert torch.allclose(some_maps.word("cat"), every_maps.word("cat"), atol=1e-6)
    with pytest.raises(TokenError, match="was not captured"):
        some_maps.word("red")


@pytest.mark.parametrize("per_step", [False, True], ids=["aggregated", "per-step"])
def test_prompt_slots_give_the_maps_of_every_slot(sd1_pipe, per_step):
    prompts = ["a red cat", "a blue xylophonist on grass"]  # different lengths: the longer one sets the slots
    dtype = torch.float32
    kept, every = Capture(per_step=per_step, storage_dtype=dtype), Capture(per_step=per_step, slots="all",
                                                                         storage_dtype=dtype)
    with xattn.hooks(sd1_pipe, kept, every):
        sd1_pipe(prompts, num_inference_steps=2, guidance_scale=5.0, height=SIZE, width=SIZE,
                 generator=torch.Generator().manual_seed(0))
    kept_maps, every_maps = kept.maps(), every.maps()
    longest = max(len(tiny_models.tokenizer().tokenize(p)) + 2 for p in prompts)
    assert kept_maps.columns == list(range(longest)) and kept_maps.others and every_maps.columns is None
    for prompt in range(2):
        for word in kept_maps.words(prompt) + ["<start>", "<end>", "<pad>"]:
            assert torch.allclose(kept_maps.word(word, prompt, normalize=False),
                                  every_maps.word(word, prompt, normalize=False), atol=1e-6), (prompt, word)
        shares = kept_maps.token_totals(prompt)
        assert shares == pytest.approx(every_maps.token_totals(prompt), abs=1e-6)
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
    assert kept.bytes_held() * 77 == every.bytes_held() * (longest + 1)  # the same sums, fewer columns


def test_self_attention_is_opt_in_and_limited_by_size(sd1_pipe):
    with pytest.raises(ValueError, match="self_attention=True"):
        Capture("kind=self")
    assert not any(layer.kind == "self" for layer in _captured_layers(sd1_pipe, Capture()))
    capture = Capture(self_attention=True, self_res=8)
    layers = _captured_layers(sd1_pipe, capture)
    self_layers = [layer for layer in layers if layer.kind == "self"]
    assert {layer.res for layer in self_layers} == {(8, 8), (4, 4)}  # the 16x16 sites are over self_res
    assert {layer.res for layer in layers if layer.kind == "cross"} == {(16, 16), (8, 8), (4, 4)}
    mean_map = capture.maps().self_attention(8)  # [64, 64]: every query's row is a distribution
    assert mean_map.shape == (64, 64)
    assert torch.allclose(mean_map.sum(dim=-1), torch.ones(64), atol=1e-5)


def _captured_layers(pipe, capture):
    run(pipe, capture, steps=1)
    return capture.maps().layers


# -- memory -----------------------------------------------------------------------------------

def test_aggregated_memory_does_not_grow_with_steps(sd1_pipe):
    held = {}
    for steps in (5, 50):
        capture = Capture()
        run(sd1_pipe, capture, steps=steps, guidance=1.0)
        held[steps] = capture.bytes_held()
        assert held[steps] == capture.planned_bytes
    assert held[5] == held[50] > 0


def test_per_step_plan_is_what_is_held(any_pipe):
    capture = Capture(per_step=True, keep_heads=True)
    run(any_pipe, capture, steps=3)
    assert capture.bytes_held() == capture.planned_bytes > 0
    layer_bytes = sum(layer.tensor().numel() * 2 for layer in capture.maps().layers)  # fp16
    assert capture.bytes_held() == layer_bytes


def test_budget_error_fires_before_sampling(sd1_pipe):
    steps_done = []

    def on_step_end(pipe, step, timestep, callback_kwargs):
        steps_done.append(step)
        return callback_kwargs

    capture = Capture(per_step=True, budget="100KB")
    with pytest.raises(CaptureBudgetError, match=r"needs .* over the budget of .*stream_to") as error:
        run(sd1_pipe, capture, steps=20, callback_on_step_end=on_step_end)
    assert "20 step(s)" in str(error.value)
    assert steps_done == []  # no denoising step finished
    assert capture.bytes_held() == 0  # nothing was stored


def test_bad_arguments_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="not a size"):
        Capture(budget="lots")
    with pytest.raises(ValueError, match="per_step=True"):
        Capture(stream_to=tmp_path / "maps")
    with pytest.raises(ValueError, match="self_res"):
        Capture(self_res=0)
    with pytest.raises(RuntimeError, match="nothing was captured"):
        Capture().maps()


# -- streaming ------------------------------------------------------------------------------------

def test_streamed_maps_equal_in_memory_maps(sd1_pipe, tmp_path):
    folder = tmp_path / "shards"
    streamed = Capture(per_step=True, stream_to=folder)
    in_memory = Capture(per_step=True)
    run(sd1_pipe, streamed, in_memory, steps=3)
    one_step = in_memory.bytes_held() // 3
    assert streamed.planned_bytes == one_step
    assert streamed.bytes_held() <= one_step
    maps = streamed.maps()
    assert sorted(p.name for p in folder.iterdir()) == [f"step_000{k}.safetensors" for k in range(3)]
    assert streamed.bytes_held() == 0  # everything is on disk after maps()
    for step in ("0:1", "2:3", None):
        assert torch.allclose(maps.word("cat", steps=step), in_memory.maps().word("cat", steps=step), atol=1e-6)
    with pytest.raises(FileExistsError, match="not empty"):
        run(sd1_pipe, Capture(per_step=True, stream_to=folder), steps=1)


# -- batches ------------------------------------------------------------------------------------------

def test_batch_maps_match_maps_computed_one_at_a_time(sd1_pipe):
    prompts = ["a red cat", "a blue dog on grass"]
    seeds = [[11, 12], [13, 14]]  # [prompt][image]
    batch = Capture()
    with xattn.hooks(sd1_pipe, batch):
        sd1_pipe(prompts, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=5.0, height=SIZE,
                 width=SIZE, generator=[torch.Generator().manual_seed(s) for row in seeds for s in row])
    batch_maps = batch.maps()
    assert (batch_maps.num_prompts, batch_maps.images_per_prompt) == (2, 2)
    for p, prompt in enumerate(prompts):
        for i in range(2):
            single = Capture()
            with xattn.hooks(sd1_pipe, single):
                sd1_pipe(prompt, num_inference_steps=2, guidance_scale=5.0, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(seeds[p][i]))
            for word in batch_maps.words(p) + ["<end>"]:
                expected = single.maps().word(word, normalize=False)
                got = batch_maps.word(word, prompt=p, image=i, normalize=False)
                assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item() + 1e-7, (p, i, word)


def test_self_attention_counts_against_the_budget(sd1_pipe):
    with pytest.raises(CaptureBudgetError, match="over the budget"):
        # self maps at 16x16 are [256, 256]: a running sum of 256 KiB
        run(sd1_pipe, Capture(self_attention=True, self_res=16, budget="200KB"))
    run(sd1_pipe, Capture(budget="200KB"))  # the same budget holds cross-attention alone (about 10 KB)


def test_kept_heads_average_to_the_default_maps(sd2_pipe):
    kept, averaged = Capture(keep_heads=True), Capture()
    run(sd2_pipe, kept, averaged)
    kept_maps = kept.maps()
    assert {layer.sites for layer in kept_maps.layers} == {(s.name,) for s in cross_sites(sd2_pipe)}  # one sum per site
    assert torch.allclose(kept_maps.word("cat", normalize=False), averaged.maps().word("cat", normalize=False),
                          atol=1e-7)
    one_head = kept_maps.layers[0].heads[:1]
    first = kept_maps.word("cat", heads=one_head, res=kept_maps.layers[0].res)
    assert not torch.allclose(first, kept_maps.word("cat", res=kept_maps.layers[0].res))


def test_two_calls_per_step_add_into_one_map(sd1_pipe):
    from diffusers import HeunDiscreteScheduler

    sd1_pipe.scheduler = HeunDiscreteScheduler.from_config(sd1_pipe.scheduler.config)
    capture = Capture("res=4", per_step=True)
    run(sd1_pipe, capture, steps=3)
    counts = sorted(layer.count for layer in capture.maps().layers)
    assert counts == [1, 2, 2]  # Heun's 2 * 3 - 1 UNet calls fall into 3 steps, one map each


def test_maps_are_a_snapshot(sd1_pipe):
    unet, capture = sd1_pipe.unet, Capture()
    generator = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with xattn.hooks(sd1_pipe.unet, capture, prompts=["a red cat"], tokenizer=sd1_pipe.tokenizer), torch.no_grad():
        unet(sample, torch.tensor(500), text)
        first = capture.maps()
        before = first.word("cat", normalize=False).clone()
        unet(sample * 2, torch.tensor(300), text)  # a bare model call: nothing resets the capture
    assert capture.maps().layers[0].count == 2 * first.layers[0].count
    assert torch.equal(first.word("cat", normalize=False), before)
