"""The run lifecycle: begin_run once per pipeline call, on_step_end once per step, in order."""

from __future__ import annotations

import pytest
import torch
from diffusers import HeunDiscreteScheduler

import xattn


class Recorder(xattn.Controller):
    """Logs every lifecycle event and every hook call, in order."""

    def __init__(self, selector="kind=cross"):
        self.selector = xattn.Selector.coerce(selector)
        self.events: list[tuple] = []
        self.runs: list[xattn.Run] = []
        self.state: list = []  # per-run state: must be empty when a run begins

    def begin_run(self, run):
        self.events.append(("begin",))
        self.runs.append(run)
        self.state = []

    def value_scale(self, x, ctx):
        self.events.append(("hook", ctx.step))
        self.state.append(ctx.step)

    def on_step_end(self, step, latents):
        self.events.append(("end", step))
        return None


def _call(pipe, prompts, images, guidance, steps=3):
    pipe(prompts, num_images_per_prompt=images, num_inference_steps=steps, guidance_scale=guidance,
         height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("prompts", [["a red circle"], ["a red circle", "a blue square"]])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_begin_run_once_then_hooks_then_one_step_end_per_step(sd1_pipe, prompts, guidance):
    recorder = Recorder()
    with xattn.hooks(sd1_pipe, recorder):
        _call(sd1_pipe, prompts, 2, guidance)
    events = recorder.events
    assert events[0] == ("begin",) and events.count(("begin",)) == 1
    ends = [e for e in events if e[0] == "end"]
    assert ends == [("end", 0), ("end", 1), ("end", 2)]
    # every hook of step s comes after step s-1 ended and before step s ends
    for step in range(3):
        end_at = events.index(("end", step))
        hooks_of_step = [i for i, e in enumerate(events) if e == ("hook", step)]
        assert hooks_of_step and max(hooks_of_step) < end_at
        if step:
            assert min(hooks_of_step) > events.index(("end", step - 1))
    run = recorder.runs[0]
    rows = 2 * len(prompts) * (2 if guidance > 1 else 1)
    assert run.layout.batch_size == rows
    assert run.layout.num_prompts == len(prompts) and run.layout.images_per_prompt == 2
    assert len(run.layout.uncond_rows()) == (rows // 2 if guidance > 1 else 0)
    assert run.num_steps == 3 and run.latent_hw == (32 // sd1_pipe.vae_scale_factor,) * 2
    assert run.prompts == tuple(prompts)


def test_a_reused_controller_holds_nothing_from_the_last_call(sd1_pipe):
    recorder = Recorder()
    with xattn.hooks(sd1_pipe, recorder):
        _call(sd1_pipe, ["a red circle"], 1, 5.0)
        first = list(recorder.state)
        _call(sd1_pipe, ["a blue square", "a red circle"], 1, 5.0, steps=2)
    assert recorder.events.count(("begin",)) == 2
    assert sorted(set(recorder.state)) == [0, 1] and len(recorder.state) < len(first)
    assert recorder.runs[1].num_steps == 2 and recorder.runs[1].prompts == ("a blue square", "a red circle")


def test_step_end_fires_once_per_step_with_a_second_order_scheduler(sd1_pipe):
    sd1_pipe.scheduler = HeunDiscreteScheduler.from_config(sd1_pipe.scheduler.config)
    recorder = Recorder()
    with xattn.hooks(sd1_pipe, recorder):
        _call(sd1_pipe, ["a red circle"], 1, 5.0, steps=4)
    assert [e for e in recorder.events if e[0] == "end"] == [("end", s) for s in range(4)]


def test_step_end_latents_reach_the_pipeline_and_the_users_callback_sees_them(sd1_pipe):
    class Zero(xattn.Controller):
        selector = xattn.Selector.coerce("kind=cross")

        def value_scale(self, x, ctx):
            return None

        def on_step_end(self, step, latents):
            return torch.zeros_like(latents) if step == 2 else None

    seen = []

    def user(pipe, i, t, kwargs):
        seen.append(float(kwargs["latents"].abs().sum()))
        return {}

    with xattn.hooks(sd1_pipe, Zero()):
        out = sd1_pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                       output_type="latent", callback_on_step_end=user,
                       generator=torch.Generator().manual_seed(0)).images
    assert len(seen) == 3 and seen[0] > 0 and seen[2] == 0.0
    assert float(out.abs().sum()) == 0.0


def test_pipeline_class_is_restored_and_unchanged_in_name(sd1_pipe):
    cls = type(sd1_pipe)
    with xattn.hooks(sd1_pipe, Recorder()):
        assert type(sd1_pipe).__name__ == cls.__name__ and isinstance(sd1_pipe, cls)
    assert type(sd1_pipe) is cls


def test_same_step_windows_give_same_steps_to_every_controller():
    from xattn.steps import parse_window, steps_in
    from xattn.edit.windows import parse_window as edit_window, steps_in as edit_steps_in
    from xattn.reweight.schedule import parse_window as reweight_window, resolve_window

    for spec in ["0:0.8", "0.8", 0.8, "2:5", "3", "0:0.3,0.6:1.0", (0, 0.5), "5:"]:
        for n in (10, 25, 50):
            selector = xattn.Selector.from_dict({"steps": spec if not isinstance(spec, tuple) else "0:0.5"})
            expected = {s for s in range(n) if selector.matches_step(s, n)}
            assert set(steps_in(parse_window(spec), n)) == expected
            assert set(edit_steps_in(edit_window(spec, what="x"), n, "x")) == expected
            assert set(resolve_window(reweight_window(spec), n, None)) == expected
            assert set(xattn.Reweight({"a": 2.0}, steps=spec).window and resolve_window(
                xattn.Reweight({"a": 2.0}, steps=spec).window, n, None)) == expected
            replace = xattn.Replace(steps=spec)
            assert set(edit_steps_in(replace.windows["default"], n, "x")) == expected
            inject = xattn.SelfInject(steps=spec)
            assert set(edit_steps_in(inject.window, n, "x")) == expected
    # a fraction written alone means the first part of the schedule, to everyone
    assert set(steps_in(parse_window("0.5"), 10)) == set(range(5))


# -- refusing what xattn does not understand --------------------------------------

def test_a_foreign_processor_is_refused_by_name_before_anything_changes(sd1_pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    class Custom(AttnProcessor2_0):  # a subclass may compute anything: not reproduced
        pass

    unet = sd1_pipe.unet
    name = next(key for key in unet.attn_processors if "attn2" in key)
    unet.set_attn_processor({**unet.attn_processors, name: Custom()})
    before = dict(unet.attn_processors)
    with pytest.raises(xattn.UnsupportedProcessorError, match=rf"{name[:-len('.processor')]} .*Custom"):
        with xattn.hooks(sd1_pipe, xattn.Hook("probs", lambda x, ctx: None)):
            pass
    assert all(unet.attn_processors[key] is before[key] for key in before)
    assert type(sd1_pipe).__name__ == "StableDiffusionPipeline" and "encode_prompt" not in vars(sd1_pipe)
    # deselecting the site is the way out
    with xattn.hooks(sd1_pipe, xattn.Hook("probs", lambda x, ctx: None, selector="kind=self")):
        pass
    ip = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=32)
    unet.set_attn_processor({**unet.attn_processors, name: ip})  # set_attn_processor empties the dict it gets
    with pytest.raises(xattn.UnsupportedProcessorError, match="IPAdapterAttnProcessor2_0.*unload_ip_adapter"):
        xattn.hooks(sd1_pipe, xattn.Hook("value_scale", lambda x, ctx: None)).__enter__()
    assert unet.attn_processors[name] is ip


def test_processor_arguments_xattn_does_not_take_are_an_error(sd1_pipe):
    with xattn.hooks(sd1_pipe, xattn.Hook("value_scale", lambda x, ctx: None)):
        with pytest.raises(xattn.UnsupportedProcessorError, match="ip_adapter_masks"):
            sd1_pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="latent",
                     cross_attention_kwargs={"ip_adapter_masks": [torch.ones(1, 32, 32)]})


def test_a_selector_that_matches_no_site_is_an_error(sd1_pipe):
    with pytest.raises(xattn.NothingSelectedError, match="matches no attention site"):
        with xattn.hooks(sd1_pipe, xattn.Hook("probs", lambda x, ctx: None, selector="sites=nowhere.*")):
            pass


def test_a_selector_that_matches_no_call_of_a_run_warns(sd1_pipe):
    with xattn.hooks(sd1_pipe, xattn.Hook("probs", lambda x, ctx: None, selector="kind=cross res=99")):
        with pytest.warns(UserWarning, match="ran at no attention call"):
            _call(sd1_pipe, ["a red circle"], 1, 5.0, steps=1)


def test_the_same_controller_twice_is_an_error(sd1_pipe):
    reweight = xattn.Reweight({"red": 2.0})
    with pytest.raises(xattn.NothingSelectedError, match="given twice"):
        xattn.hooks(sd1_pipe, reweight, reweight)
    with xattn.hooks(sd1_pipe, reweight):
        with pytest.raises(xattn.NothingSelectedError, match="enclosing"):
            with xattn.hooks(sd1_pipe, reweight):
                pass


@pytest.mark.parametrize("controller", [
    lambda: xattn.Hook("probs", lambda x, ctx: None, selector="heads=0"),
    lambda: xattn.Hook("probs", lambda x, ctx: None, selector="tokens=red"),
    lambda: xattn.Reweight({"red": 2.0}, selector="heads=99"),
])
def test_slicing_keys_a_controller_ignores_are_refused(sd1_pipe, controller):
    with pytest.raises(xattn.SelectorError, match="does not honour"):
        with xattn.hooks(sd1_pipe, controller()):
            pass


def test_capture_honours_heads_in_its_selector(sd1_pipe):
    with xattn.hooks(sd1_pipe, xattn.Capture(selector="heads=0")):
        pass


def test_describe_says_fused_explicit_or_untouched_per_site(sd1_pipe):
    with xattn.hooks(sd1_pipe, xattn.Reweight({"red": 2.0}), xattn.Capture(selector="res=4")) as session:
        table = session.describe()
    lines = {line.split()[0]: line for line in table.splitlines()[2:]}
    sites = xattn.sites(sd1_pipe)
    for site in sites:
        line = lines[site.name]
        if site.kind == "self":
            assert "untouched" in line
        else:
            assert "explicit" in line and "Reweight, Capture" in line  # Capture reads probs
    assert len(lines) == len(sites)


def test_unmatched_rows_are_an_error_naming_the_pipeline(sd1_pipe):
    def shift(module, args, kwargs):  # the text changes between encoding and the UNet
        kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"] + 1.0
        return args, kwargs

    handle = sd1_pipe.unet.register_forward_pre_hook(shift, with_kwargs=True, prepend=True)
    try:
        with xattn.hooks(sd1_pipe, xattn.Hook("value_scale", lambda x, ctx: None)):
            with pytest.raises(xattn.LayoutError, match="StableDiffusionPipeline call matches none"):
                _call(sd1_pipe, ["a red circle"], 1, 5.0, steps=1)
    finally:
        handle.remove()


def test_prompts_name_the_rows_of_a_call_with_prompt_embeds_and_guidance(sd1_pipe):
    embeds, _ = sd1_pipe.encode_prompt("a red circle", "cpu", 1, False)
    recorder = Recorder()
    with xattn.hooks(sd1_pipe, recorder, prompts=["a red circle"]):
        sd1_pipe(prompt_embeds=embeds, num_inference_steps=1, guidance_scale=5.0, height=32, width=32,
                 output_type="latent")
    layout = recorder.runs[0].layout
    assert layout.batch_size == 2 and len(layout.cond_rows()) == 1 and len(layout.uncond_rows()) == 1
    assert layout.token_map(0).indices("red") == [2]


def test_hookable_names_each_site_xattn_refuses_and_the_table_says_so(sd1_pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from xattn.install import hookable
    from xattn.sites import format_table

    class Custom(AttnProcessor2_0):
        pass

    unet = sd1_pipe.unet
    name = next(key for key in unet.attn_processors if "attn2" in key)
    unet.set_attn_processor({**unet.attn_processors, name: Custom()})
    support = hookable(sd1_pipe)
    site = name[: -len(".processor")]
    assert support[site] == "Custom"
    assert all(reason is None for other, reason in support.items() if other != site)
    table = format_table(xattn.sites(sd1_pipe), support)
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert rows[site].endswith("no: Custom") and all(r.endswith("yes") for s, r in rows.items() if s != site)


# -- steering: before_step -----------------------------------------------------------

class Shift(xattn.Controller):
    """Adds ``delta`` to the latents before step ``at``; optionally takes a gradient through ``denoise``."""

    selector = xattn.Selector.coerce("kind=cross")

    def __init__(self, at, delta, use_gradient=False):
        self.at, self.delta, self.use_gradient = at, delta, use_gradient
        self.grads, self.probs_calls = [], 0

    def active(self, ctx):
        return self.use_gradient  # otherwise no hook runs: the fused path, equal to stock

    def probs(self, x, ctx):
        self.probs_calls += 1

    def before_step(self, steer):
        if steer.step != self.at:
            return None
        if self.use_gradient:
            z = steer.latents.clone().requires_grad_(True)
            out = steer.denoise(z)
            (grad,) = torch.autograd.grad(out.pow(2).mean(), z)
            self.grads.append(grad)
            assert out.shape[0] == len(steer.layout.rows) == len(steer.layout.cond_rows())
        return steer.latents + self.delta


def _latents(pipe, seed=0):
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("at", [0, 2])
def test_before_step_equals_changing_the_latents_by_hand(sd1_pipe, at):
    start, delta = _latents(sd1_pipe), 0.3
    call = dict(prompt=["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=5.0, height=32,
                width=32, output_type="latent")
    if at == 0:
        expected = sd1_pipe(**call, latents=start + delta).images
    else:
        def by_hand(pipe, i, t, kwargs):
            return {"latents": kwargs["latents"] + delta} if i == at - 1 else {}
        expected = sd1_pipe(**call, latents=start.clone(), callback_on_step_end=by_hand).images
    with xattn.hooks(sd1_pipe, Shift(at, delta)):
        steered = sd1_pipe(**call, latents=start.clone()).images
    torch.testing.assert_close(steered, expected, rtol=0, atol=1e-5)


def test_a_steering_pass_has_gradients_and_runs_only_its_own_hooks(sd1_pipe):
    shift = Shift(1, 0.0, use_gradient=True)
    counter = []
    other = xattn.Hook("probs", lambda x, ctx: counter.append(x.shape[0]), "kind=cross")
    with xattn.hooks(sd1_pipe, shift, other):
        sd1_pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                 output_type="latent")
    (grad,) = shift.grads
    assert grad.shape == (1, 4, 16, 16) and grad.abs().sum() > 0
    sites = len([s for s in xattn.sites(sd1_pipe) if s.kind == "cross"])
    assert counter == [2] * (3 * sites)  # the other hook saw the 3 normal calls only (2 rows each)
    assert shift.probs_calls == 3 * sites + sites  # and the steering controller its own pass too (1 row)
