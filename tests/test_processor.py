"""The xattn processor computes what diffusers' AttnProcessor2_0 computes, on every path."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import xattn
from xattn.processor import XattnProcessor
from reference import copy_row_zero_map, reference_probs, row_one_borrows_row_zero

TOLERANCE = 1e-5


def unet_inputs(unet, batch: int = 2, seed: int = 0, size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    kwargs = {}
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=generator),
            "time_ids": torch.tensor([[size * 4, size * 4, 0, 0, size * 4, size * 4]] * batch, dtype=torch.float32),
        }
    sample = torch.randn(batch, config.in_channels, size, size, generator=generator)
    text = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    return (sample, torch.tensor(501), text), kwargs


def run_unet(unet, args, kwargs):
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def stock_output(unet, args, kwargs):
    original = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        return run_unet(unet, args, kwargs)
    finally:
        unet.set_attn_processor(original)


def test_no_hooks_matches_stock_sdpa(any_pipe):
    unet = any_pipe.unet
    args, kwargs = unet_inputs(unet)
    expected = stock_output(unet, args, kwargs)
    with xattn.hooks(unet):
        assert all(isinstance(p, XattnProcessor) for p in unet.attn_processors.values())
        got = run_unet(unet, args, kwargs)
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_explicit_path_matches_fused_path(any_pipe):
    unet = any_pipe.unet
    args, kwargs = unet_inputs(unet, seed=1)
    expected = stock_output(unet, args, kwargs)
    calls = []
    observe = xattn.Hook("probs", lambda p, ctx: calls.append(ctx.name), selector="kind=all")
    with xattn.hooks(unet, observe):
        got = run_unet(unet, args, kwargs)
    assert len(calls) == len(xattn.sites(unet))  # the explicit path really ran everywhere
    assert (got - expected).abs().max().item() <= TOLERANCE


def _token_weights(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 77, generator=generator) * 2.0 + 0.1  # [b, j], per row and token


def test_value_scale_path_equals_explicit_multiply(any_pipe):
    unet = any_pipe.unet
    args, kwargs = unet_inputs(unet, seed=2)
    weights = _token_weights(2, seed=3)
    fused = xattn.Hook("value_scale", lambda x, ctx: x * weights, selector="kind=cross")
    explicit = xattn.Hook("probs", lambda p, ctx: p * weights[:, None, None, :], selector="kind=cross")
    with xattn.hooks(unet, fused):
        got = run_unet(unet, args, kwargs)
    with xattn.hooks(unet, explicit):
        expected = run_unet(unet, args, kwargs)
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert (got - stock_output(unet, args, kwargs)).abs().max().item() > 1e-3  # the weights did something


def test_logit_bias_path_equals_multiply_and_renormalise(any_pipe):
    unet = any_pipe.unet
    args, kwargs = unet_inputs(unet, seed=4)
    weights = _token_weights(2, seed=5)

    def renormalised(p, ctx):
        scaled = p * weights[:, None, None, :]
        return scaled / scaled.sum(dim=-1, keepdim=True)

    fused = xattn.Hook("logit_bias", lambda x, ctx: x + weights.log(), selector="kind=cross")
    explicit = xattn.Hook("probs", renormalised, selector="kind=cross")
    with xattn.hooks(unet, fused):
        got = run_unet(unet, args, kwargs)
    with xattn.hooks(unet, explicit):
        expected = run_unet(unet, args, kwargs)
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert (got - stock_output(unet, args, kwargs)).abs().max().item() > 1e-3


def test_map_rows_path_equals_copying_the_map_explicitly(any_pipe):
    # Row 1 attends with row 0's map (over its own values) at every site: fused Q/K gather vs copied probs.
    unet = any_pipe.unet
    args, kwargs = unet_inputs(unet, seed=7)

    with xattn.hooks(unet, xattn.Hook("map_rows", row_one_borrows_row_zero, selector="kind=all")):
        got = run_unet(unet, args, kwargs)
    with xattn.hooks(unet, xattn.Hook("probs", copy_row_zero_map, selector="kind=all")):
        expected = run_unet(unet, args, kwargs)
    assert (got - expected).abs().max().item() <= TOLERANCE
    stock = stock_output(unet, args, kwargs)
    assert (got[0] - stock[0]).abs().max().item() <= TOLERANCE  # the lending row is untouched
    assert (got[1] - stock[1]).abs().max().item() > 1e-3  # the borrowing row changed


def test_map_rows_must_name_existing_rows(sd1_pipe):
    unet = sd1_pipe.unet
    args, kwargs = unet_inputs(unet)
    bad = xattn.Hook("map_rows", lambda rows, ctx: rows + 5, selector="kind=self")
    with xattn.hooks(unet, bad), pytest.raises(ValueError, match="row indices in 0..1"):
        run_unet(unet, args, kwargs)


def test_hook_sees_probabilities_equal_to_float64_reference(any_pipe):
    unet = any_pipe.unet
    args, kwargs = unet_inputs(unet, seed=6)
    modules = dict(unet.named_modules())
    inputs, seen = {}, {}

    def remember_inputs(name):
        def pre_hook(module, a, kw):
            inputs[name] = (a[0] if a else kw["hidden_states"], kw.get("encoder_hidden_states"))
        return pre_hook

    handles = [modules[s.name].register_forward_pre_hook(remember_inputs(s.name), with_kwargs=True)
               for s in xattn.sites(unet)]
    keep = xattn.Hook("probs", lambda p, ctx: seen.__setitem__(ctx.site.name, p.clone()), selector="kind=all")
    try:
        with xattn.hooks(unet, keep):
            run_unet(unet, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert set(seen) == {s.name for s in xattn.sites(unet)}
    for name, probs in seen.items():
        hidden, context = inputs[name]
        reference = reference_probs(modules[name], hidden, context)
        assert probs.shape == reference.shape
        assert (probs.double() - reference).abs().max().item() <= 1e-5, name


def test_hook_must_keep_shape(sd1_pipe):
    unet = sd1_pipe.unet
    args, kwargs = unet_inputs(unet)
    bad = xattn.Hook("probs", lambda p, ctx: p[..., :10], selector="kind=cross")
    with xattn.hooks(unet, bad):
        try:
            run_unet(unet, args, kwargs)
        except ValueError as error:
            assert "must keep the input's shape" in str(error) and ".probs" in str(error)
        else:
            raise AssertionError("a hook that changes the shape must be refused")


def test_processor_signatures_are_stored_and_name_the_arguments_of_their_code():
    """diffusers parses ``inspect.signature(processor.__call__)`` at every attention call; xattn stores it once.

    The stored signature must still be the function's: its names are checked against the code object.
    """
    import inspect

    from xattn.ip_adapter import XattnIPAdapterProcessor
    from xattn.joint import JointProcessor

    for cls in (XattnProcessor, JointProcessor, XattnIPAdapterProcessor):
        call = cls.__call__
        assert "__signature__" in vars(call), cls
        code = call.__code__
        names = list(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount])
        if code.co_flags & inspect.CO_VARARGS:
            names.append(code.co_varnames[len(names)])
        if code.co_flags & inspect.CO_VARKEYWORDS:
            names.append(code.co_varnames[len(names)])
        assert list(inspect.signature(call).parameters) == names, cls
