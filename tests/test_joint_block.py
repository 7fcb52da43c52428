"""The joint core's block path (xattn.joint_block) against the explicit path that builds the whole map.

Without gradients on the CPU, ``probs`` hooks at joint sites get the
image->text block computed alone; with gradients the same hooks run on the
whole joint softmax. Both must give the same output and show the same block,
whatever the hooks do to it (observe, change it in place, return a new one,
several hooks in a row), and the whole map a hook asks for must be the same.
"""

from __future__ import annotations

import pytest
import torch

import xattn
from joint_reference import flux_inputs, flux_model, sd3_inputs, sd3_model
from xattn.joint import whole_joint_map


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("joint-block")
    return {"sd3": (sd3_model(folder / "sd3"), sd3_inputs(3)), "flux": (flux_model(folder / "flux"), flux_inputs(3))}


def run(model, inputs, hooks, grad: bool):
    """(output, blocks the probs hooks saw): without gradients the block path, with them the explicit one."""
    seen = []
    keep = xattn.Hook("probs", lambda p, ctx: seen.append(p.detach().clone()), "kind=joint")
    with torch.set_grad_enabled(grad), xattn.hooks(model, *hooks, keep, layout=xattn.BatchLayout.plain(2)):
        out = model(**inputs).sample
    return out.detach(), seen


def zero_in_place(p, ctx):
    p[..., 1] = 0
    return p


def halve_new(p, ctx):
    return p * 0.5


def add_column(p, ctx):
    p = p.clone()
    p[..., 0] += 0.1
    return p


CASES = {
    "observe": [],
    "in place": [xattn.Hook("probs", zero_in_place, "kind=joint")],
    "new tensor": [xattn.Hook("probs", halve_new, "kind=joint")],
    "in place then new": [xattn.Hook("probs", zero_in_place, "kind=joint"),
                          xattn.Hook("probs", add_column, "kind=joint")],
    "with value_scale and logit_bias": [
        xattn.Hook("value_scale", lambda w, ctx: w * torch.linspace(0.5, 1.5, w.shape[-1]), "kind=joint"),
        xattn.Hook("logit_bias", lambda b, ctx: b + torch.linspace(-1, 1, b.shape[-1]), "kind=joint"),
        xattn.Hook("probs", zero_in_place, "kind=joint")],
    "with map_rows": [xattn.Hook("map_rows", lambda r, ctx: torch.tensor([1, 1]), "kind=joint"),
                      xattn.Hook("probs", halve_new, "kind=joint")],
}


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("case", list(CASES))
def test_block_path_equals_the_explicit_path(models, family, case):
    model, inputs = models[family]
    block_out, block_seen = run(model, inputs, CASES[case], grad=False)
    whole_out, whole_seen = run(model, inputs, CASES[case], grad=True)
    assert (block_out - whole_out).abs().max() <= 1e-5, case
    assert len(block_seen) == len(whole_seen) > 0
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(block_seen, whole_seen))
    with torch.no_grad():
        stock = model(**inputs).sample
    if case != "observe":
        assert (block_out - stock).abs().max() > 1e-4  # the hooks did change the result


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_whole_map_is_built_when_asked_and_equals_the_explicit_one(models, family):
    model, inputs = models[family]
    found = {False: [], True: []}
    for grad in (False, True):
        def ask(p, ctx, seen=found[grad]):
            probs, parts = whole_joint_map()
            seen.append((probs.detach().clone(), parts))

        with torch.set_grad_enabled(grad), \
                xattn.hooks(model, xattn.Hook("probs", ask, "kind=joint"), layout=xattn.BatchLayout.plain(2)):
            model(**inputs)
    assert len(found[False]) == len(found[True]) > 0
    for (a, parts_a), (b, parts_b) in zip(found[False], found[True]):
        assert parts_a == parts_b and (a - b).abs().max() <= 1e-6
    assert whole_joint_map() is None  # only while probs hooks run


def test_which_path_runs(models, monkeypatch):
    import xattn.joint as joint

    used = []
    original = joint.block_attention
    monkeypatch.setattr(joint, "block_attention", lambda *a, **k: used.append(1) or original(*a, **k))
    model, inputs = models["sd3"]
    run(model, inputs, [], grad=False)
    assert len(used) == 2  # two joint sites, no gradients: the block path
    used.clear()
    run(model, inputs, [], grad=True)
    run(model, inputs, [xattn.Hook("scores", lambda s, ctx: None, "kind=joint")], grad=False)
    assert used == []  # gradients, or a scores hook: the whole map
