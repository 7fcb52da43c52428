"""Guidance beyond SD 1.x: SDXL (added conditions), SD3 and Flux (joint attention, flow matching).

What is checked on each is what makes guidance guidance: the loss read from
the model's own maps falls at each refinement of a step (so its gradient
reaches the latents through this model), and a window that holds no step of
the run leaves the samples as the stock pipeline makes them.
"""
import pytest
import torch

import xattn
from joint_reference import sd3_pipeline
from test_flux_pipeline import pipe as flux_pipe  # noqa: F401 (a fixture)
from test_guide import run_whole_passes
from xattn.guide import Excite, Guide


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    return sd3_pipeline(tmp_path_factory.mktemp("sd3_guide") / "pipe")


CALLS = {
    "sdxl": dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="latent"),
    "sd3": dict(num_inference_steps=3, guidance_scale=4.0, output_type="latent"),
    "flux": dict(num_inference_steps=3, guidance_scale=3.5, height=16, width=16, output_type="latent",
                 max_sequence_length=16),
}


@pytest.fixture(params=sorted(CALLS))
def model(request):
    pipe = request.getfixturevalue({"sdxl": "sdxl_pipe", "sd3": "sd3_pipe", "flux": "flux_pipe"}[request.param])
    return request.param, pipe


def test_refinement_lowers_the_loss_at_each_repeat(model):
    name, pipe = model
    guide = Guide(Excite(["red", "circle"]), steps="0:1", step_size=0.5, refine={0: 0.0}, max_refine=2, res=None)
    with xattn.hooks(pipe, guide):
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **CALLS[name])
    at_zero = [loss for step, loss in guide.losses_seen if step == 0]
    assert len(at_zero) == 3, guide.losses_seen
    assert all(later < earlier for earlier, later in zip(at_zero, at_zero[1:])), at_zero


def test_a_stopped_gradient_pass_steers_as_a_whole_one(model, monkeypatch):
    """Passes after a run's first stop after the guide's last map; on every family the latents are the same."""
    name, pipe = model

    def run():
        guide = Guide(Excite(["red", "circle"]), steps="0:2", step_size=0.5, refine={0: 0.0}, max_refine=1,
                      res=None)
        with xattn.hooks(pipe, guide):
            out = pipe("a red circle", generator=torch.Generator().manual_seed(0), **CALLS[name]).images
        return out, guide

    stopped, guide = run()
    assert guide._reads_per_pass and len(guide.losses_seen) == 3
    run_whole_passes(monkeypatch)
    whole, _ = run()
    torch.testing.assert_close(stopped, whole, rtol=0, atol=0)


def test_a_window_without_steps_leaves_the_stock_samples(model):
    name, pipe = model
    stock = pipe("a red circle", generator=torch.Generator().manual_seed(0), **CALLS[name]).images
    with xattn.hooks(pipe, Guide(Excite("red"), steps="3:4")):
        guided = pipe("a red circle", generator=torch.Generator().manual_seed(0), **CALLS[name]).images
    torch.testing.assert_close(guided, stock, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_default_res_reads_a_transformers_patch_grid(name, request, sdxl_pipe):
    """res="auto": on a transformer every site sees the one patch grid, whatever its size; on a UNet, 16 and 8."""
    from xattn.selector import Selector

    pipe = request.getfixturevalue({"sd3": "sd3_pipe", "flux": "flux_pipe"}[name])
    guide = Guide(Excite(["red", "circle"]), steps="0:1", step_size=0.5)
    grids = []
    probe = xattn.Hook("probs", lambda probs, ctx: grids.append(ctx.res), selector="kind=cross")
    call = {**CALLS[name], **({"height": 24, "width": 24} if name == "flux" else {})}  # a 12 x 12 grid
    with xattn.hooks(pipe, guide, probe):
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **call)
    assert guide.losses_seen and guide.selector.res is None
    assert not set(grids) & {(16, 16), (8, 8)}, grids  # 16,8 would have matched nothing here
    with xattn.hooks(sdxl_pipe, guide):  # the same Guide on a UNet reads 16 and 8 again
        assert guide.selector.res == Selector.parse("res=16,8").res
