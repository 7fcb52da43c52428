"""IP-Adapter: stock parity, text and image-branch maps against float64, per-layer scales, edits, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from PIL import Image

import tiny_models
import xattn
from xattn.hookpoints import BatchLayout, Row
from xattn.install import hookable
from xattn.ip_adapter import IPCapture, IPHook, XattnIPAdapterProcessor, adapter_of
from xattn.reweight import Reweight

PROMPT = "a red circle and a blue square"
SLOTS = {"red": 2, "circle": 3, "blue": 6, "square": 7}  # slot 0 is the start token
TOLERANCE = 1e-5
IMAGE = Image.new("RGB", (32, 32), (200, 40, 30))


@pytest.fixture
def ip_pipe(sd1_pipe):
    return tiny_models.add_ip_adapter(sd1_pipe)


@pytest.fixture
def two_ip_pipe(sd1_pipe):
    return tiny_models.add_ip_adapter(sd1_pipe, adapters=2)


def _call(pipe, **kwargs):
    kwargs.setdefault("ip_adapter_image", IMAGE)
    return pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def _ip_sites(unet) -> list[str]:
    return [key[: -len(".processor")] for key, p in unet.attn_processors.items()
            if isinstance(p, IPAdapterAttnProcessor2_0)]


# -- float64 reference ---------------------------------------------------------------------

def _linear(layer, x):
    return F.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double())


def _heads(t, heads):
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)  # [b, h, n, d]


def _reference(attn, processor, hidden, text, images, weights=None):
    """One IP-Adapter cross site in float64: text probs, per-adapter image probs, and the module output.

    The text map may be reweighted (``weights`` [b, j], post-softmax); the
    image branch is diffusers': scale_a * softmax(Q K_a^T / sqrt(d)) V_a, added.
    """
    assert attn.group_norm is None and attn.spatial_norm is None and not attn.norm_cross
    assert not attn.residual_connection and attn.rescale_output_factor == 1.0 and attn.norm_q is None
    x, e = hidden.double(), text.double()
    q = _heads(_linear(attn.to_q, x), attn.heads)
    k, v = _heads(_linear(attn.to_k, e), attn.heads), _heads(_linear(attn.to_v, e), attn.heads)
    d = q.shape[-1]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [b, h, i, j]
    weighted = probs if weights is None else probs * weights[:, None, None, :]
    out = weighted @ v
    image_probs = []
    for states, scale, to_k, to_v in zip(images, processor.scale, processor.to_k_ip, processor.to_v_ip):
        states = states.double().flatten(1, 2)  # [b, n_images * tokens, d_ctx]
        k_ip, v_ip = _heads(_linear(to_k, states), attn.heads), _heads(_linear(to_v, states), attn.heads)
        p_ip = torch.softmax(q @ k_ip.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [b, h, i, n_a]
        image_probs.append(p_ip)
        out = out + scale * (p_ip @ v_ip)
    out = out.transpose(1, 2).reshape(x.shape[0], -1, attn.heads * d)
    return probs, image_probs, _linear(attn.to_out[0], out)


def _record_cross_sites(unet, controllers, layout=None, adapters=1, seed=0):
    """One bare UNet call with image embeddings; {site: (module, processor, hidden, text, images, output)}."""
    generator = torch.Generator().manual_seed(seed)
    batch = 2
    sample = torch.randn(batch, 4, 16, 16, generator=generator)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    embeds = [torch.randn(batch, 1, tiny_models.IMAGE_EMBED_DIM, generator=generator) for _ in range(adapters)]
    modules = dict(unet.named_modules())
    records, handles = {}, []
    for name in _ip_sites(unet):
        def keep(module, args, kwargs, output, name=name):
            hidden = args[0] if args else kwargs["hidden_states"]
            context, images = kwargs["encoder_hidden_states"]
            records[name] = (module, module.processor, hidden, context, images, output)

        handles.append(modules[name].register_forward_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad(), xattn.hooks(unet, *controllers, layout=layout):
            assert all(isinstance(unet.attn_processors[n + ".processor"], XattnIPAdapterProcessor) for n in records)
            unet(sample, torch.tensor(501), text, added_cond_kwargs={"image_embeds": embeds})
    finally:
        for handle in handles:
            handle.remove()
    assert records and all(isinstance(r[1], XattnIPAdapterProcessor) for r in records.values())
    return records


# -- parity ----------------------------------------------------------------------------------

def test_no_hooks_gives_the_stock_output_with_an_image_or_its_embeddings(ip_pipe):
    before = dict(ip_pipe.unet.attn_processors)
    stock = _call(ip_pipe)
    embeds = ip_pipe.prepare_ip_adapter_image_embeds(IMAGE, None, "cpu", 1, True)
    stock_embeds = _call(ip_pipe, ip_adapter_image=None, ip_adapter_image_embeds=embeds)
    with xattn.hooks(ip_pipe):
        ip_sites = [p for p in ip_pipe.unet.attn_processors.values() if isinstance(p, XattnIPAdapterProcessor)]
        assert len(ip_sites) == len(_ip_sites(ip_pipe.unet)) == 7
        hooked = _call(ip_pipe)
        hooked_embeds = _call(ip_pipe, ip_adapter_image=None, ip_adapter_image_embeds=embeds)
    torch.testing.assert_close(hooked, stock, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(hooked_embeds, stock_embeds, rtol=0, atol=TOLERANCE)
    # the image branch is really there: without it the output differs
    ip_pipe.set_ip_adapter_scale(0.0)
    assert (_call(ip_pipe) - stock).abs().max().item() > 1e-2
    after = ip_pipe.unet.attn_processors
    assert all(after[key] is before[key] for key in before)  # the stock objects are back


def test_no_hooks_gives_the_stock_output_on_every_architecture(any_pipe):
    pipe = tiny_models.add_ip_adapter(any_pipe)
    stock = _call(pipe)
    with xattn.hooks(pipe, IPCapture()):  # the capture runs the explicit image branch at every cross site
        hooked = _call(pipe)
    with xattn.hooks(pipe):
        fused = _call(pipe)
    torch.testing.assert_close(fused, stock, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(hooked, stock, rtol=0, atol=10 * TOLERANCE)
    pipe.set_ip_adapter_scale(0.0)
    assert (_call(pipe) - stock).abs().max().item() > 1e-3


def test_weights_stay_in_the_unet_and_follow_it(ip_pipe):
    keys = {k for k in ip_pipe.unet.state_dict() if "to_k_ip" in k}
    assert keys
    with xattn.hooks(ip_pipe):
        assert {k for k in ip_pipe.unet.state_dict() if "to_k_ip" in k} == keys
        ip_pipe.unet.to(torch.float64)
        assert all(p.dtype == torch.float64 for n, p in ip_pipe.unet.named_parameters() if "to_k_ip" in n)


# -- maps against float64 ------------------------------------------------------------------------

def test_text_and_image_maps_equal_float64_reference(two_ip_pipe):
    unet = two_ip_pipe.unet
    text_maps, image_maps, contexts = {}, {}, []

    def text(x, ctx):
        text_maps[ctx.site.name] = x.clone()

    def image(x, ctx):
        contexts.append(ctx.point)
        image_maps[(ctx.site.name, adapter_of(ctx))] = x.clone()

    two_ip_pipe.set_ip_adapter_scale([0.7, 1.3])
    records = _record_cross_sites(unet, [xattn.Hook("probs", text, "kind=cross"), IPHook("ip_probs", image)],
                                  adapters=2)
    assert set(contexts) == {"ip:0.probs", "ip:1.probs"}
    for name, (module, processor, hidden, context, images, output) in records.items():
        probs, image_probs, expected = _reference(module, processor, hidden, context, images)
        assert text_maps[name].shape[-1] == 77  # the text points see the text slots only
        assert (text_maps[name].double() - probs).abs().max().item() <= TOLERANCE, name
        for adapter in (0, 1):
            got = image_maps[(name, adapter)]
            assert got.shape == image_probs[adapter].shape and got.shape[-1] == 4, name
            assert (got.double() - image_probs[adapter]).abs().max().item() <= TOLERANCE, (name, adapter)
        # the explicit image path (forced by the hook) still gives diffusers' output
        assert (output.double() - expected).abs().max().item() <= 2e-5, name
    assert not torch.allclose(image_maps[(name, 0)], image_maps[(name, 1)])


def test_ip_probs_hook_changes_the_image_branch_only(ip_pipe):
    """Zeroing the image map removes the image branch: the output is the text attention alone."""
    records = _record_cross_sites(ip_pipe.unet, [IPHook("ip_probs", lambda x, ctx: torch.zeros_like(x))])
    for name, (module, processor, hidden, context, images, output) in records.items():
        _, _, with_images = _reference(module, processor, hidden, context, images)
        _, _, text_only = _reference(module, processor, hidden, context, [])
        assert (output.double() - text_only).abs().max().item() <= 2e-5, name
        assert (with_images - text_only).abs().max().item() > 1e-3, name


def test_ip_capture_maps_image_tokens(ip_pipe):
    capture = IPCapture()
    with xattn.hooks(ip_pipe, capture):
        _call(ip_pipe)
    assert {r.adapter for r in capture.records} == {0}
    assert {r.step for r in capture.records} == {0, 1}
    maps = capture.maps(0)
    assert maps.shape == (2, 4, 16, 16)  # [b rows (CFG), 4 image tokens, h, w] at the largest res (the latent's)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 16, 16))  # the branch's own softmax
    with pytest.raises(LookupError, match="IP-Adapter 1"):
        capture.maps(1)


# -- scales ------------------------------------------------------------------------------------

PER_LAYER = {"down": {"block_0": 1.5}, "up": {"block_1": [0.0, 2.0]}}


def test_per_layer_scales_match_stock_set_before_or_inside_the_session(ip_pipe):
    uniform = _call(ip_pipe)
    ip_pipe.set_ip_adapter_scale(PER_LAYER)
    stock = _call(ip_pipe)
    assert (stock - uniform).abs().max().item() > 1e-2
    scales = {n: p.scale[0] for n, p in ip_pipe.unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)}
    assert sorted(set(scales.values())) == [0.0, 1.5, 2.0]
    capture = IPCapture()
    with xattn.hooks(ip_pipe, capture):  # the capture makes the image branch explicit: float rounding only
        torch.testing.assert_close(_call(ip_pipe), stock, rtol=0, atol=10 * TOLERANCE)
        # a layer at scale 0 is skipped, as diffusers skips it: no map there
        zero = {n[: -len(".processor")] for n, s in scales.items() if s == 0.0}
        assert zero and not zero & {r.site for r in capture.records}
        ip_pipe.set_ip_adapter_scale(1.0)  # inside the session: reaches xattn's processors
        torch.testing.assert_close(_call(ip_pipe), uniform, rtol=0, atol=10 * TOLERANCE)
        ip_pipe.set_ip_adapter_scale(PER_LAYER)
    torch.testing.assert_close(_call(ip_pipe), stock, rtol=0, atol=TOLERANCE)  # the stock processors agree


# -- edits leave the image branch alone ------------------------------------------------------------

def test_reweight_on_a_text_word_equals_the_explicit_reference(ip_pipe):
    tokenizer = tiny_models.tokenizer()
    layout = BatchLayout(rows=(Row(False, 0, 0), Row(True, 0, 0)), prompts=(PROMPT,),
                         token_maps=(xattn.TokenMap(tokenizer, PROMPT),))
    words = {"red": 2.5, "square": 0.0}
    weights = torch.ones(2, 77, dtype=torch.float64)
    for word, value in words.items():
        weights[1, SLOTS[word]] = value
    ip_pipe.set_ip_adapter_scale(0.8)
    records = _record_cross_sites(ip_pipe.unet, [Reweight(words)], layout=layout)
    for name, (module, processor, hidden, context, images, output) in records.items():
        _, _, expected = _reference(module, processor, hidden, context, images, weights)
        _, _, unweighted = _reference(module, processor, hidden, context, images)
        assert (output.double() - expected).abs().max().item() <= 2e-5, name
        assert (expected[1] - unweighted[1]).abs().max().item() > 1e-4, name  # the weights did something
        assert (output[0].double() - unweighted[0]).abs().max().item() <= 2e-5, name  # unconditional row kept


def test_map_injection_keeps_each_rows_own_image_branch(ip_pipe):
    """``map_rows`` (prompt-to-prompt) borrows the text map; the image branch uses the row's own queries."""
    def borrow(rows, ctx):
        rows[1] = 0
        return rows

    records = _record_cross_sites(ip_pipe.unet, [xattn.Hook("map_rows", borrow, "kind=cross")])
    for name, (module, processor, hidden, context, images, output) in records.items():
        probs, image_probs, _ = _reference(module, processor, hidden, context, images)
        x, e = hidden.double(), context.double()
        v = _heads(_linear(module.to_v, e), module.heads)
        out = torch.stack([probs[0] @ v[0], probs[0] @ v[1]])  # row 1: row 0's text map over its own values
        for states, scale, to_v, p_ip in zip(images, processor.scale, processor.to_v_ip, image_probs):
            out = out + scale * (p_ip @ _heads(_linear(to_v, states.double().flatten(1, 2)), module.heads))
        expected = _linear(module.to_out[0], out.transpose(1, 2).reshape(2, -1, module.heads * v.shape[-1]))
        assert (output.double() - expected).abs().max().item() <= 2e-5, name


# -- masks and what is refused ----------------------------------------------------------------------

def _masks(*shapes):
    """One mask per adapter through diffusers' IPAdapterMaskProcessor: left half, right half, ... (64 x 64)."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    made = []
    for count in shapes:
        pictures = []
        for image in range(count):
            pixels = torch.zeros(64, 64, dtype=torch.uint8)
            pixels[:, (image % 2) * 32:(image % 2 + 1) * 32] = 255
            pictures.append(Image.fromarray(pixels.numpy()))
        made.append(IPAdapterMaskProcessor().preprocess(pictures, height=64, width=64).reshape(1, count, 64, 64))
    return made


def test_ip_adapter_masks_match_stock_fused_and_hooked(two_ip_pipe):
    masks = _masks(1, 1)
    kwargs = dict(ip_adapter_image=[IMAGE, IMAGE.rotate(90)], cross_attention_kwargs={"ip_adapter_masks": masks})
    two_ip_pipe.set_ip_adapter_scale([0.7, 1.3])
    unmasked = _call(two_ip_pipe, ip_adapter_image=kwargs["ip_adapter_image"])
    stock = _call(two_ip_pipe, **kwargs)
    assert (stock - unmasked).abs().max().item() > 1e-3  # the masks did something
    capture = IPCapture()
    with xattn.hooks(two_ip_pipe):
        fused = _call(two_ip_pipe, **kwargs)
    with xattn.hooks(two_ip_pipe, capture, Reweight({"red": 1.0})):  # explicit text and image branches
        hooked = _call(two_ip_pipe, **kwargs)
    torch.testing.assert_close(fused, stock, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(hooked, stock, rtol=0, atol=10 * TOLERANCE)
    assert {r.adapter for r in capture.records} == {0, 1}


def test_masks_with_several_images_and_per_image_scales_match_stock(ip_pipe):
    """Two images on one adapter, each its own mask and scale: each image attends on its own, as in diffusers."""
    second = Image.new("RGB", (32, 32), (20, 200, 90))
    ip_pipe.set_ip_adapter_scale(1.0)
    for processor in ip_pipe.unet.attn_processors.values():
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            processor.scale[0] = [0.4, 1.6]  # diffusers applies per-image scales with masks
    kwargs = dict(ip_adapter_image=[[IMAGE, second]], cross_attention_kwargs={"ip_adapter_masks": _masks(2)})
    stock = _call(ip_pipe, **kwargs)
    seen = []

    def look(x, ctx):
        seen.append(x.clone())

    with xattn.hooks(ip_pipe):
        fused = _call(ip_pipe, **kwargs)
    with xattn.hooks(ip_pipe, IPHook("ip_probs", look)):
        hooked = _call(ip_pipe, **kwargs)
    torch.testing.assert_close(fused, stock, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(hooked, stock, rtol=0, atol=10 * TOLERANCE)
    # the two images side by side (4 tokens each), each image's softmax its own
    assert seen and all(x.shape[-1] == 8 for x in seen)
    for x in seen:
        torch.testing.assert_close(x[..., :4].sum(-1), torch.ones_like(x[..., 0]))
        torch.testing.assert_close(x[..., 4:].sum(-1), torch.ones_like(x[..., 0]))


def test_bad_masks_fail_as_in_diffusers(two_ip_pipe):
    kwargs = dict(ip_adapter_image=[IMAGE, IMAGE], cross_attention_kwargs={"ip_adapter_masks": _masks(1)})
    with pytest.raises(ValueError, match="Length of ip_adapter_masks"):
        _call(two_ip_pipe, **kwargs)
    with xattn.hooks(two_ip_pipe):
        with pytest.raises(ValueError, match="Length of ip_adapter_masks"):
            _call(two_ip_pipe, **kwargs)


def test_masks_without_an_ip_adapter_are_still_refused(sd1_pipe):
    with xattn.hooks(sd1_pipe):
        with pytest.raises(xattn.UnsupportedProcessorError, match="ip_adapter_masks"):
            sd1_pipe(PROMPT, num_inference_steps=1, height=32, width=32, output_type="latent",
                     cross_attention_kwargs={"ip_adapter_masks": _masks(1)})


def test_per_image_scales_are_refused_by_name(ip_pipe):
    name = next(k for k, p in ip_pipe.unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0))
    ip_pipe.unet.attn_processors[name].scale[0] = [0.5, 0.7]  # diffusers applies these only with masks
    with xattn.hooks(ip_pipe):
        with pytest.raises(xattn.UnsupportedProcessorError, match="one scale per image"):
            _call(ip_pipe)


def test_an_ip_processor_without_the_image_projection_is_refused_before_anything_changes(sd1_pipe):
    unet = sd1_pipe.unet
    name = next(key for key in unet.attn_processors if "attn2" in key)
    ip = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=32)
    unet.set_attn_processor({**unet.attn_processors, name: ip})
    before = dict(unet.attn_processors)
    with pytest.raises(xattn.UnsupportedProcessorError,
                       match=r"IPAdapterAttnProcessor2_0.*image projection.*load_ip_adapter"):
        xattn.hooks(sd1_pipe).__enter__()
    assert all(unet.attn_processors[key] is before[key] for key in before)
    assert hookable(unet)[name[: -len(".processor")]] == "IPAdapterAttnProcessor2_0"


def test_a_subclass_or_image_tokens_at_a_plain_site_are_refused(ip_pipe):
    unet = ip_pipe.unet

    class Custom(IPAdapterAttnProcessor2_0):
        pass

    name = _ip_sites(unet)[0] + ".processor"
    stock = unet.attn_processors[name]
    custom = Custom(hidden_size=stock.hidden_size, cross_attention_dim=stock.cross_attention_dim)
    unet.set_attn_processor({**unet.attn_processors, name: custom})
    with pytest.raises(xattn.UnsupportedProcessorError, match="Custom"):
        xattn.hooks(ip_pipe).__enter__()
    # diffusers' plain processor at a site that receives image tokens: xattn says so instead of failing on a tuple
    unet.set_attn_processor({**unet.attn_processors, name: AttnProcessor2_0()})
    with xattn.hooks(ip_pipe):
        with pytest.raises(xattn.UnsupportedProcessorError, match="receives IP-Adapter image tokens"):
            _call(ip_pipe)


def test_ip_hook_points_are_checked():
    with pytest.raises(xattn.HookError, match="ip_scores, ip_probs"):
        IPHook("probs", lambda x, ctx: None)
    hook = IPHook("up_blocks.*.attn2.ip_scores", lambda x, ctx: None)
    assert hook.selector.sites == ("up_blocks.*.attn2",) and hook.points().keys() == {"ip_scores"}


# -- the image prompt weighted like a word ----------------------------------------------------------
def test_ip_weight_everywhere_equals_diffusers_scale_and_a_window_schedules_it(ip_pipe):
    from xattn.ip_adapter import IPWeight

    full = _call(ip_pipe)
    ip_pipe.set_ip_adapter_scale(0.5)
    half = _call(ip_pipe)  # diffusers' own scale: the reference
    ip_pipe.set_ip_adapter_scale(1.0)
    assert (half - full).abs().max().item() > 1e-2
    with xattn.hooks(ip_pipe, IPWeight(0.5)):
        torch.testing.assert_close(_call(ip_pipe), half, rtol=0, atol=10 * TOLERANCE)
    with xattn.hooks(ip_pipe, IPWeight({0: 0.5}, steps="2:3")):  # a 2-step run has no step 2: nothing changes
        torch.testing.assert_close(_call(ip_pipe), full, rtol=0, atol=10 * TOLERANCE)
    with xattn.hooks(ip_pipe, IPWeight(0.5, steps="0:1")):  # the first step only: between the two
        first = _call(ip_pipe)
    assert (first - full).abs().max().item() > 1e-4 and (first - half).abs().max().item() > 1e-4
    for bad in (float("nan"), float("inf"), 1e9, True):
        with pytest.raises(xattn.HookError, match="finite"):
            IPWeight(bad)
    with pytest.raises(xattn.HookError, match="index"):
        IPWeight({"a": 1.0})
