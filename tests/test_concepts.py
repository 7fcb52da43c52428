"""Concept maps (ConceptAttention) on joint attention: the image is untouched, the concept rows are exact.

The reference runs the stock processors with the concept rows appended as text
and an explicit float64 attention in which no image or text query may see a
concept key, so the concept stream's outputs and the maps built from them come
from plain math, not from xattn's split.
"""
import pytest
import torch
import torch.nn.functional as F

import xattn
from joint_reference import sd3_pipeline
from xattn.concepts import concept_embeddings

CONCEPTS = ["red", "circle", "background"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    p = sd3_pipeline(tmp_path_factory.mktemp("sd3_concepts") / "pipe")
    return p.to(torch.float64)


def call(pipe, **kw):
    return pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).images


def reference_maps(pipe, concepts):
    """Concept rows as masked text in explicit float64 attention; maps from the recorded outputs."""
    import diffusers.models.attention_processor as where

    k = len(concepts)
    rows = concept_embeddings(pipe, concepts)
    found = []
    grid = pipe.transformer.config.sample_size // pipe.transformer.config.patch_size
    image = grid * grid

    def explicit(q, key, v, dropout_p=0.0, is_causal=False, **_):
        s = q.shape[2]
        logits = q @ key.transpose(-1, -2) * q.shape[-1] ** -0.5
        if s == image + pipe_text[0] + k:  # a joint call: the prompt's rows must not see the concepts
            logits[:, :, : s - k, s - k:] = float("-inf")
        out = logits.softmax(-1) @ v
        if s == image + pipe_text[0] + k:
            b, h = q.shape[:2]
            img = out[:, :, :image].transpose(1, 2).reshape(b, image, -1)
            con = out[:, :, s - k:].transpose(1, 2).reshape(b, k, -1)
            found.append((img @ con.transpose(1, 2)).softmax(-1))  # [b, i, k]
        return out

    pipe_text = [0]

    def before(module, args, kwargs):
        text = kwargs["encoder_hidden_states"]
        pipe_text[0] = text.shape[1]
        kwargs["encoder_hidden_states"] = torch.cat([text, rows.to(text.dtype)[None].expand(text.shape[0], -1, -1)], 1)
        return args, kwargs

    class Shim:
        scaled_dot_product_attention = staticmethod(explicit)

        def __getattr__(self, name):
            return getattr(F, name)

    real = where.F
    handle = pipe.transformer.register_forward_pre_hook(before, with_kwargs=True)
    where.F = Shim()
    try:
        latents = call(pipe)
    finally:
        where.F = real
        handle.remove()
    total = torch.stack(found).mean(0)  # [b, i, k]
    return latents, total.transpose(1, 2).reshape(total.shape[0], k, grid, grid)


def test_the_image_is_untouched_and_the_maps_equal_explicit_masked_attention(pipe):
    stock = call(pipe)
    with xattn.concepts(pipe, CONCEPTS) as found:
        ours = call(pipe)
    # The prompt's rows see only their own keys; the longer text batch rounds the text stream's matmuls
    # differently (float64: ~1e-16), so equal up to rounding, not bit for bit.
    assert (ours - stock).abs().max().item() < 1e-12
    ref_latents, ref_maps = reference_maps(pipe, CONCEPTS)
    assert (ref_latents - stock).abs().max().item() < 1e-10  # masking the concept columns changes nothing
    maps = found.maps()
    assert maps.shape == ref_maps.shape == (2, 3, 4, 4)  # [uncond, cond] rows, 3 concepts, 4x4 patch grid
    assert (maps - ref_maps.float()).abs().max().item() < 1e-5
    assert torch.allclose(maps.sum(1), torch.ones(2, 4, 4))  # a softmax over the concepts per image token
    assert found.calls == 2
    assert found.word("circle", size=(16, 16)).shape == (16, 16)


def test_inside_a_session_with_other_hooks_nothing_changes_for_them(pipe):
    alone = xattn.Capture()
    with xattn.hooks(pipe, alone):
        plain = call(pipe)
    capture = xattn.Capture()
    with xattn.hooks(pipe, capture):
        with xattn.concepts(pipe, CONCEPTS) as found:
            both = call(pipe)
    assert (both - plain).abs().max().item() < 1e-12
    _, reference = reference_maps(pipe, CONCEPTS)
    assert (found.maps() - reference.float()).abs().max().item() < 1e-5
    for word in ("red", "circle"):  # the capture saw the prompt's text columns only, as without concepts
        assert (capture.maps().word(word) - alone.maps().word(word)).abs().max().item() < 1e-6


def test_blocks_selects_layers_and_cross_maps_are_a_softmax_too(pipe):
    with xattn.concepts(pipe, CONCEPTS, blocks=[1]) as last:
        call(pipe)
    with xattn.concepts(pipe, CONCEPTS) as every:
        call(pipe)
    assert not torch.allclose(last.maps(), every.maps())
    assert torch.allclose(last.maps("cross").sum(1), torch.ones(2, 4, 4))


def test_refusals_are_named(pipe, sd1_pipe):
    with pytest.raises(xattn.ConceptError, match="UNet|transformer"):
        xattn.concepts(sd1_pipe, ["cat"])
    for bad in ([], ["red", "red"], [""]):
        with pytest.raises(xattn.ConceptError):
            xattn.concepts(pipe, bad)
    with pytest.raises(xattn.ConceptError, match="blocks"):
        xattn.concepts(pipe, ["red"], blocks=[7])
    with xattn.concepts(pipe, ["red"]) as found:
        pass
    with pytest.raises(xattn.ConceptError, match="no concept maps"):
        found.maps()
    with pytest.raises(xattn.ConceptError, match="not one of"):
        found.word("blue")


def test_concept_grid_draws_one_panel_per_concept(pipe):
    from PIL import Image

    from xattn.capture.pictures import concept_grid

    with xattn.concepts(pipe, CONCEPTS) as found:
        call(pipe)
    picture = concept_grid(Image.new("RGB", (32, 32), "white"), found)
    one = concept_grid(Image.new("RGB", (32, 32), "white"), found, kind="cross")
    assert picture.size == one.size and picture.width > 3 * picture.height  # image + 3 panels side by side
    assert picture.tobytes() != one.tobytes()  # output-space and cross maps differ
