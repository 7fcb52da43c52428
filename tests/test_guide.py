"""Guidance: losses against independent arithmetic, gradient steps that lower them, and boxes on the shapes world."""

from __future__ import annotations

import math

import pytest
import torch

import xattn
from xattn.guide import Bind, Excite, Guide, GuidanceError, Layout, loss_from_dict


def _blob(h, w, y, x, value=1.0):
    m = torch.full((8, 8), 1e-3, dtype=torch.float64)
    m[y:y + h, x:x + w] = value
    return m


def test_excite_is_one_minus_the_weakest_smoothed_peak():
    strong, weak = _blob(3, 3, 0, 0, 0.9), _blob(3, 3, 4, 4, 0.3)
    loss = Excite(["a", "b"])({"a": strong, "b": weak})
    # a 3x3 plateau keeps its value under a normalised 3x3 smoothing at its centre
    assert math.isclose(float(loss), 1 - 0.3, abs_tol=1e-9)
    assert float(Excite(["a"])({"a": strong})) == pytest.approx(0.1)


def test_layout_counts_the_mass_outside_the_box():
    m = torch.zeros(8, 8, dtype=torch.float64)
    m[:, :2] = 1.0   # 16 cells on the left
    m[:, 6:] = 3.0   # 16 cells on the right, three times as heavy
    left_half = (0.0, 0.0, 0.5, 1.0)
    assert float(Layout({"x": left_half})({"x": m})) == pytest.approx(1 - 16 / 64)
    assert float(Layout({"x": (0.5, 0.0, 1.0, 1.0)})({"x": m})) == pytest.approx(1 - 48 / 64)


def test_bind_is_symmetric_kl_to_the_own_noun_minus_the_others():
    red, circle, square = _blob(2, 2, 0, 0), _blob(2, 2, 0, 1), _blob(2, 2, 5, 5)

    def kl(p, q):
        p, q = p / p.sum(), q / q.sum()
        return float((p * (p / q).log()).sum())

    expected = 0.5 * (kl(red, circle) + kl(circle, red)) - 0.5 * (kl(red, square) + kl(square, red))
    got = Bind({"red": "circle", "blue": "square"})({"red": red, "circle": circle, "square": square,
                                                     "blue": square})
    blue_term = 0.0 - 0.5 * (kl(square, circle) + kl(circle, square))  # blue sits on its square exactly
    assert float(got) == pytest.approx((expected + blue_term) / 2, rel=1e-9)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad", [
    lambda: Excite([]), lambda: Bind({}), lambda: Layout({"x": (0.5, 0, 0.2, 1)}),
    lambda: Layout({"x": (0, 0, 2, 1)}), lambda: Excite("a", weight=float("nan")),
    lambda: Guide(), lambda: Guide(Excite("a"), step_size=float("inf")), lambda: Guide(Excite("a"), steps=3),
    lambda: loss_from_dict({"loss": "nope"}),
])
def test_bad_guidance_is_refused_by_name(bad):
    with pytest.raises(GuidanceError):
        bad()


@pytest.mark.parametrize("bad, message", [
    (lambda: Guide(Excite("a"), step_size=NAN), "step_size must be a finite number"),
    (lambda: Guide(Excite("a"), step_size=-INF), "step_size must be a finite number"),
    (lambda: Guide(Excite("a"), step_size=0), "step_size must be a positive"),
    (lambda: Guide(Excite("a"), step_size=1e7), "step_size must be a positive"),
    (lambda: Guide(Excite("a"), step_size="big"), "step_size must be a number"),
    (lambda: Guide(Excite("a"), refine={0: NAN}), "refine target at step 0 must be a finite number"),
    (lambda: Guide(Excite("a"), refine={0: INF}), "refine target at step 0 must be a finite number"),
    (lambda: Guide(Excite("a"), refine={0: -INF}), "refine target at step 0 must be a finite number"),
    (lambda: Guide(Excite("a"), refine={0: 1e39}), "float32"),
    (lambda: Guide(Excite("a"), refine={2: -0.1}), "below 0.0, the smallest loss Excite can reach"),
    (lambda: Guide(Excite("a"), Layout({"a": (0, 0, 1, 1)}), refine={0: -1}), "Excite, Layout"),
    (lambda: Guide(Excite("a"), refine={-1: 0.1}), "refine step must be between 0"),
    (lambda: Guide(Excite("a"), refine={1.5: 0.1}), "refine step must be a whole number"),
    (lambda: Guide(Excite("a"), refine=[0.1]), "refine must be a mapping"),
    (lambda: Guide(Excite("a"), max_refine=-1), "max_refine must be between 0"),
    (lambda: Guide(Excite("a"), max_refine=10**9), "max_refine must be between 0"),
    (lambda: Guide(Excite("a"), max_refine=NAN), "max_refine must be a whole number"),
    (lambda: Excite("a", weight=INF), "Excite weight must be a finite number"),
    (lambda: Bind({"red": "circle"}, weight="x"), "Bind weight must be a number"),
    (lambda: Layout({"x": (0, 0, NAN, 1)}), "box of 'x' must be a finite number"),
    (lambda: Layout({"x": 0.5}), "four numbers"),
])
def test_non_finite_and_out_of_range_numbers_are_refused_at_construction(bad, message):
    with pytest.raises(GuidanceError, match=message) as caught:
        bad()
    assert isinstance(caught.value, xattn.XattnError)


def test_a_target_a_loss_without_a_floor_can_reach_is_kept():
    assert Guide(Bind({"red": "circle", "blue": "square"}), refine={"3": -0.5}).refine == {3: -0.5}
    assert Guide(Excite("a"), refine={0: 0.0}, max_refine=0).refine == {0: 0.0}  # the floor itself is in range


def test_records_round_trip():
    guide = Guide(Excite(["red", "circle"]), Bind({"red": "circle"}, weight=2.0),
                  Layout({"red circle": (0, 0, 0.5, 1)}), steps="0:0.4", step_size=7.5, refine={0: 0.2})
    again = Guide.from_dict(guide.to_dict())
    assert again.to_dict() == guide.to_dict()


def test_refinement_lowers_the_loss_at_each_repeat(sd1_pipe):
    guide = Guide(Excite(["red", "circle"]), steps="0:1", step_size=0.5, refine={0: 0.0}, max_refine=3,
                  res=None)  # 0 is Excite's floor: never reached here, so every repeat runs
    with xattn.hooks(sd1_pipe, guide):
        sd1_pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
    at_zero = [loss for step, loss in guide.losses_seen if step == 0]
    assert len(at_zero) == 4
    assert all(later < earlier for earlier, later in zip(at_zero, at_zero[1:]))


def test_refinement_outside_the_window_is_refused_before_the_first_step(sd1_pipe):
    guide = Guide(Excite(["red", "circle"]), steps="0:1", refine={0: 0.5, 2: 0.5})  # step 2 is never guided
    with xattn.hooks(sd1_pipe, guide), pytest.raises(GuidanceError, match=r"refine steps \[2\] lie outside"):
        sd1_pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
    assert guide.losses_seen == []  # refused at the run's start: nothing was guided


def test_refinement_is_per_image_so_a_batch_equals_its_images_one_by_one(sd1_pipe):
    """Attend-and-Excite refines each image until its own loss reaches the target: batching must not change that."""
    call = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                output_type="latent")

    passes, counting = _grad_passes(sd1_pipe)  # rows of each pass taken with gradients (the guide's own)
    gradient_rows = []  # per run: their sum

    def run(seeds, target):
        guide = Guide(Excite(["red", "circle"]), steps="0:1", step_size=0.5, refine={0: target}, max_refine=3,
                      res=None)
        del passes[:]
        with xattn.hooks(sd1_pipe, guide):
            out = sd1_pipe(**call, num_images_per_prompt=len(seeds),
                           generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        gradient_rows.append(sum(passes))
        return out, [loss for _, loss in guide.losses_seen]

    try:
        firsts = [run([seed], 0.0)[1][0] for seed in (0, 1)]
        target = sum(firsts) / 2  # one image starts above the target and refines, the other stops after one step
        del gradient_rows[:]
        alone = [run([seed], target) for seed in (0, 1)]
        assert sorted(len(seen) for _, seen in alone)[0] == 1 and max(len(seen) for _, seen in alone) > 1
        batch, _ = run([0, 1], target)
    finally:
        counting.remove()
    torch.testing.assert_close(batch, torch.cat([out for out, _ in alone]), rtol=1e-4, atol=1e-4)
    # the image that reached its target is not denoised again: the batch takes the passes the images take alone
    assert gradient_rows[2] == gradient_rows[0] + gradient_rows[1], gradient_rows


def _grad_passes(pipe):
    """A list that fills with the number of rows of each denoiser pass taken with gradients; and its hook."""
    rows = []

    def count(module, args, kwargs):
        if torch.is_grad_enabled():
            rows.append((args[0] if args else kwargs["sample"]).shape[0])

    return rows, pipe.unet.register_forward_pre_hook(count, with_kwargs=True)


def test_refinement_steps_from_the_pass_that_reached_the_target_as_algorithm_1_does(sd1_pipe):
    """Chefer et al. 2023, Algorithm 1: denoise, step (always), and go back while the loss was above the target.

    An image whose second pass reaches the target has then taken two steps: the same latents as a run whose
    target cannot be reached but whose repeats are capped at one.
    """
    call = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                output_type="latent")

    def run(target, max_refine):
        guide = Guide(Excite(["red", "circle"]), steps="0:1", step_size=0.5, refine={0: target},
                      max_refine=max_refine, res=None)
        with xattn.hooks(sd1_pipe, guide):
            out = sd1_pipe(**call, generator=torch.Generator().manual_seed(0)).images
        return out, [loss for _, loss in guide.losses_seen]

    passes, hook = _grad_passes(sd1_pipe)
    try:
        capped, (first, second) = run(0.0, 1)  # 0 is Excite's floor: two passes, two steps
        assert second < first
        del passes[:]
        reached, seen = run((first + second) / 2, 5)  # the second pass is under this target: no third
    finally:
        hook.remove()
    assert seen == [first, second] and len(passes) == 2
    torch.testing.assert_close(reached, capped, rtol=0, atol=0)


def run_whole_passes(monkeypatch) -> None:
    """Make every gradient pass of a Guide run to the denoiser's end (its stop after the last map, undone)."""
    counted = Guide._loss

    def whole_passes(self, *a, **k):  # forget the count: this pass runs to the end
        self._reads_per_pass = None
        return counted(self, *a, **k)

    monkeypatch.setattr(Guide, "_loss", whole_passes)


def test_a_gradient_pass_stops_after_the_last_map_it_reads(sd1_pipe, monkeypatch):
    """Later passes stop at the guide's last site (nothing after it changes the loss): same latents, less work."""
    call = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                output_type="latent")
    tail = []  # passes with gradients that reached the UNet's last layer
    hook = sd1_pipe.unet.conv_out.register_forward_hook(lambda *a: tail.append(1) if torch.is_grad_enabled() else None)

    def run():
        guide = Guide(Excite(["red", "circle"]), steps="0:2", step_size=0.5, refine={0: 0.0}, max_refine=2, res=None)
        del tail[:]
        with xattn.hooks(sd1_pipe, guide):
            return sd1_pipe(**call, generator=torch.Generator().manual_seed(0)).images, len(guide.losses_seen)

    try:
        stopped, passes = run()
        assert passes == 4 and len(tail) == 1  # 3 passes at step 0, 1 at step 1: only the first ran to the end
        run_whole_passes(monkeypatch)
        whole, _ = run()
        assert len(tail) == 4
    finally:
        hook.remove()
    torch.testing.assert_close(stopped, whole, rtol=0, atol=0)


def test_guidance_outside_its_window_leaves_sampling_unchanged(sd1_pipe):
    call = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                output_type="latent")
    stock = sd1_pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with xattn.hooks(sd1_pipe, Guide(Excite("red"), steps="3:4")):  # a 3-step run has no step 3
        guided = sd1_pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(guided, stock, rtol=0, atol=1e-5)


def test_unknown_words_are_refused_before_sampling(sd1_pipe):
    with xattn.hooks(sd1_pipe, Guide(Excite("hat"))):
        with pytest.raises(xattn.TokenError, match="hat"):
            sd1_pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="latent")


class _Broken(Excite):
    """Excite whose loss turns non-finite from ``from_call`` on (a stand-in for an overflow)."""

    def __init__(self, words, value, from_call=0):
        super().__init__(words)
        self.value, self.from_call, self.calls = value, from_call, 0

    def __call__(self, word_maps):
        loss = super().__call__(word_maps)
        self.calls += 1
        return loss * self.value if self.calls > self.from_call else loss


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_with_the_step_and_leaves_the_latents(sd1_pipe, value):
    loss = _Broken("circle", value, from_call=1)  # step 0 is fine, step 1 breaks
    seen = []
    with xattn.hooks(sd1_pipe, Guide(loss, steps="0:3", step_size=0.5, res=None)):
        with pytest.raises(GuidanceError, match="at step 1") as caught:
            sd1_pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                     output_type="latent", generator=torch.Generator().manual_seed(0),
                     callback_on_step_end=lambda pipe, step, t, kw: seen.append(kw["latents"].clone()) or {})
    assert str(value) in str(caught.value) and isinstance(caught.value, xattn.XattnError)
    assert len(seen) == 1 and torch.isfinite(seen[0]).all()  # no step ran on NaN latents


def test_word_slots_are_resolved_once_per_pipeline_call(sd1_pipe, monkeypatch):
    from xattn.tokens import TokenMap

    calls = []
    original = TokenMap.indices
    monkeypatch.setattr(TokenMap, "indices", lambda self, key: calls.append(key) or original(self, key))
    guide = Guide(Excite(["red", "circle"]), steps="0:3", step_size=0.5, refine={0: 0.0, 1: 0.0}, max_refine=2,
                  res=None)
    with xattn.hooks(sd1_pipe, guide):
        sd1_pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
    assert len(guide.losses_seen) >= 7  # 3 passes at steps 0 and 1, one at step 2
    assert sorted(calls) == ["circle", "red"]


def test_a_reused_guide_resolves_the_words_of_each_new_prompt(sd1_pipe):
    guide = Guide(Excite("circle"), steps="0:1", step_size=0.5, res=None)
    call = dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="latent")
    with xattn.hooks(sd1_pipe, guide):
        sd1_pipe("a red circle", **call)
        assert guide._slots[0].words == {"circle": [2]}  # slot 3, after the start token
        sd1_pipe("a circle", **call)
        assert guide._slots[0].words == {"circle": [1]}
        with pytest.raises(xattn.TokenError, match="circle"):
            sd1_pipe("a red square", **call)


@pytest.mark.slow
def test_a_box_moves_the_object_into_it_on_the_shapes_world(world_pipe):
    from xattn.world import measure

    def share_left(guided: bool) -> float:
        inside = 0
        for seed in range(8):
            controllers = [Guide(Layout({"red circle": (0.0, 0.0, 0.5, 1.0)}), step_size=20.0)] if guided else []
            with xattn.hooks(world_pipe, *controllers) if guided else torch.no_grad():
                image = world_pipe("a red circle", num_inference_steps=25, guidance_scale=4.0,
                                   generator=torch.Generator().manual_seed(seed)).images[0]
            mask = measure.object_mask(measure.as_rgb(image), "red")
            inside += bool(mask.sum() >= measure.MIN_BLOB and measure.centroid(mask)[1] < mask.shape[1] / 2)
        return inside / 8

    plain, guided = share_left(False), share_left(True)
    assert guided >= 0.75 and guided >= plain + 0.25, (plain, guided)


@pytest.mark.parametrize("rows", [[], [1], [-1]])
def test_a_steering_pass_over_rows_the_call_does_not_have_is_refused_by_name(sd1_pipe, rows):
    from xattn.lifecycle import LifecycleError

    class DenoiseRows(xattn.Controller):
        def before_step(self, steer):
            steer.denoise(steer.latents, rows)  # one image: its only conditional row is 0

    with xattn.hooks(sd1_pipe, DenoiseRows()), pytest.raises(LifecycleError, match=r"rows among 0\.\.0, not"):
        sd1_pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
