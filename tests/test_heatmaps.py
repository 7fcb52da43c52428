"""Word maps: upsample, merge pieces, combine layers and steps, normalise -- against float64 math written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
import xattn
from xattn.capture import Capture, MapLayer, WordMaps
from xattn.hookpoints import Row
from xattn.tokens import TokenError, TokenMap

PROMPT = "a red xylophonist"
IMAGE = (12, 8)  # (H, W): not square, not a multiple of every layer, to catch axis mix-ups


def bilinear(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with half-pixel centres (what align_corners=False means), in float64 loops."""
    in_h, in_w = grid.shape
    out = np.zeros(size)
    for y in range(size[0]):
        for x in range(size[1]):
            sy = min(max((y + 0.5) * in_h / size[0] - 0.5, 0.0), in_h - 1)
            sx = min(max((x + 0.5) * in_w / size[1] - 0.5, 0.0), in_w - 1)
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
            fy, fx = sy - y0, sx - x0
            out[y, x] = ((1 - fy) * (1 - fx) * grid[y0, x0] + (1 - fy) * fx * grid[y0, x1]
                         + fy * (1 - fx) * grid[y1, x0] + fy * fx * grid[y1, x1])
    return out


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps around a point ``t`` past the second one (a = -0.75)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize with half-pixel centres, edge taps repeated, in float64 loops."""
    in_h, in_w = grid.shape

    def taps(out_index, in_size, out_size):
        source = (out_index + 0.5) * in_size / out_size - 0.5
        base = int(np.floor(source))
        indices = [min(max(base + k, 0), in_size - 1) for k in (-1, 0, 1, 2)]
        return indices, cubic_weights(source - base)

    out = np.zeros(size)
    for y in range(size[0]):
        rows, wy = taps(y, in_h, size[0])
        for x in range(size[1]):
            cols, wx = taps(x, in_w, size[1])
            out[y, x] = sum(wy[m] * wx[n] * grid[rows[m], cols[n]] for m in range(4) for n in range(4))
    return out


def token_map() -> TokenMap:
    return TokenMap(tiny_models.tokenizer(), PROMPT)


def random_layers(per_step: bool, seed: int = 0) -> list[MapLayer]:
    """Layers whose rows are sums of softmax distributions, as a capture would hold."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for res in ((4, 2), (2, 1)):  # 8 and 2 query positions; (H, W) halves as in a UNet
        for step in range(3):
            calls = 2  # e.g. two sites at this resolution
            logits = 5 * torch.rand(calls, 2, 3, res[0] * res[1], 77, generator=generator)  # [calls, rows, heads, i, j]
            data = logits.softmax(dim=-1).mean(dim=2).sum(dim=0)[:, None]  # heads averaged, calls summed: [rows, 1, i, j]
            layers.append(MapLayer("cross", res, (step,), (f"site{res[0]}",), calls, None, data=data))
    if per_step:
        return layers
    merged = {}
    for layer in layers:
        if layer.res in merged:
            merged[layer.res].data = merged[layer.res].data + layer.data
            merged[layer.res].count += layer.count
        else:
            merged[layer.res] = MapLayer("cross", layer.res, (0, 1, 2), layer.sites, layer.count, None,
                                         data=layer.data.clone())
    return list(merged.values())


def word_maps(layers) -> WordMaps:
    rows = (Row(True, 0, 0), Row(True, 0, 1))
    return WordMaps(layers, rows=rows, columns=None, prompts=[PROMPT], token_maps=[token_map()],
                    image_size=IMAGE, num_steps=3)


def reference(layers, slots, row, steps=None, res=None, resize=bicubic) -> np.ndarray:
    total, count = np.zeros(IMAGE), 0
    for layer in layers:
        if steps is not None and layer.steps[0] not in steps:
            continue
        if res is not None and layer.res != res:
            continue
        data = layer.data.double().numpy()[row]  # [heads, i, j]
        word = data[:, :, slots].sum(axis=-1).mean(axis=0)  # [i]
        total += resize(word.reshape(layer.res), IMAGE)
        count += layer.count
    return np.maximum(total / count, 0.0)


def min_max(x):
    return (x - x.min()) / (x.max() - x.min())


def test_word_map_equals_reference_with_pieces_merged():
    layers = random_layers(per_step=False)
    maps = word_maps(layers)
    slots = token_map().indices("xylophonist")
    assert len(slots) > 1  # a word of several BPE pieces
    for row in (0, 1):
        raw = maps.word("xylophonist", image=row, normalize=False)
        assert raw.shape == IMAGE and raw.dtype == torch.float32
        expected = reference(layers, slots, row)
        assert np.abs(raw.double().numpy() - expected).max() <= 1e-6
        shown = maps.word("xylophonist", image=row)
        assert np.abs(shown.double().numpy() - min_max(expected)).max() <= 1e-5
        smooth = maps.word("xylophonist", image=row, normalize=False, upsample="bilinear")
        assert np.abs(smooth.double().numpy() - reference(layers, slots, row, resize=bilinear)).max() <= 1e-6


def test_phrase_and_special_tokens_use_their_slots():
    layers = random_layers(per_step=False, seed=1)
    maps = word_maps(layers)
    slots = token_map().indices
    phrase = maps.word("red xylophonist", normalize=False).double().numpy()
    assert np.abs(phrase - reference(layers, slots("red") + slots("xylophonist"), 0)).max() <= 1e-6
    start = maps.word("<start>", normalize=False).double().numpy()
    assert np.abs(start - reference(layers, [0], 0)).max() <= 1e-6
    end_slot = 1 + len(tiny_models.tokenizer().tokenize(PROMPT))
    end = maps.word("<end>", normalize=False).double().numpy()
    assert np.abs(end - reference(layers, [end_slot], 0)).max() <= 1e-6


def test_step_and_resolution_choices():
    layers = random_layers(per_step=True, seed=2)
    maps = word_maps(layers)
    assert maps.per_step and maps.steps == [0, 1, 2] and maps.resolutions == [(4, 2), (2, 1)]
    slots = token_map().indices("red")
    for steps, wanted in (("1:3", {1, 2}), ((0, 1), {0}), ([2], {2}), ("0:0.5", {0, 1})):
        got = maps.word("red", steps=steps, normalize=False).double().numpy()
        assert np.abs(got - reference(layers, slots, 0, steps=wanted)).max() <= 1e-6, steps
    got = maps.word("red", res=2, normalize=False).double().numpy()
    assert np.abs(got - reference(layers, slots, 0, res=(2, 1))).max() <= 1e-6
    # The per-step maps add up to the aggregated ones.
    aggregated = word_maps(random_layers(per_step=False, seed=2))
    assert torch.allclose(aggregated.word("red"), maps.word("red"), atol=1e-6)


def test_aggregated_maps_refuse_a_partial_step_range():
    maps = word_maps(random_layers(per_step=False))
    with pytest.raises(ValueError, match="per_step=True"):
        maps.word("red", steps="0:2")
    assert torch.allclose(maps.word("red", steps="0:3"), maps.word("red"))


def test_token_totals_are_shares_that_sum_to_one():
    layers = random_layers(per_step=False, seed=3)
    maps = word_maps(layers)
    totals = maps.token_totals()
    assert list(totals) == ["<start>", "a", "red", "xylophonist", "<end>", "<pad>"]
    assert abs(sum(totals.values()) - 1.0) <= 1e-6  # float32 sums
    slots = token_map().indices("xylophonist")
    mass = sum(layer.data[0, 0][:, slots].double().sum().item() for layer in layers)
    queries = sum(layer.count * layer.res[0] * layer.res[1] for layer in layers)
    assert abs(totals["xylophonist"] - mass / queries) <= 1e-9


def test_bad_lookups_say_what_would_be_right():
    maps = word_maps(random_layers(per_step=False))
    with pytest.raises(TokenError, match="its words are: 'a', 'red', 'xylophonist'"):
        maps.word("blue")
    with pytest.raises(IndexError, match="1 prompt"):
        maps.word("red", prompt=1)
    with pytest.raises(IndexError, match="2 image"):
        maps.word("red", image=2)
    with pytest.raises(ValueError, match="keep_heads=True"):
        maps.word("red", heads=[0])
    with pytest.raises(LookupError, match="captured resolutions"):
        maps.word("red", res=16)
    with pytest.raises(ValueError, match="res="):
        maps.word("red", res="huge")


def test_maps_come_out_at_the_generated_image_size(sd1_pipe):
    capture = Capture()
    with xattn.hooks(sd1_pipe, capture):
        image = sd1_pipe("a red cat", num_inference_steps=2, guidance_scale=5.0, height=32, width=48,
                         generator=torch.Generator().manual_seed(0)).images[0]
    heat = capture.maps().word("cat")
    assert tuple(heat.shape) == (image.height, image.width) == (32, 48)
    assert heat.min().item() == 0.0 and heat.max().item() == 1.0
    assert capture.maps().words() == ["a", "red", "cat"]


def test_site_choice_needs_per_site_sums(sd1_pipe):
    per_site, aggregated = Capture(per_step=True, storage_dtype=torch.float32), Capture()
    with xattn.hooks(sd1_pipe, per_site, aggregated):
        sd1_pipe("a red cat", num_inference_steps=2, guidance_scale=5.0, height=32, width=32)
    maps = per_site.maps()
    up = maps.word("cat", sites="up_blocks.*", normalize=False, upsample="bilinear")
    down = maps.word("cat", sites="down_blocks.*", normalize=False, upsample="bilinear")
    middle = maps.word("cat", sites="mid_block.*", normalize=False, upsample="bilinear")
    calls = {name: sum(l.count for l in maps.layers if l.sites[0].startswith(name)) for name in ("up", "down", "mid")}
    combined = (up * calls["up"] + down * calls["down"] + middle * calls["mid"]) / sum(calls.values())
    whole = maps.word("cat", normalize=False, exclude=None, upsample="bilinear")
    assert torch.allclose(combined, whole, atol=1e-6)  # the parts add up to the whole
    with pytest.raises(ValueError, match="splits the summed map"):
        aggregated.maps().word("cat", sites="up_blocks.*")
    assert torch.allclose(aggregated.maps().word("cat", sites="*"), aggregated.maps().word("cat", exclude=None))
    # By default the mid block's own sum is left out: the same as choosing the other blocks' sites.
    assert torch.allclose(aggregated.maps().word("cat"), aggregated.maps().word("cat", sites="[du]*_blocks.*"))
    # ... unless nothing else is asked for: the mid block's own size.
    mid_res = next(layer.res for layer in maps.layers if layer.sites[0].startswith("mid_block"))
    assert torch.allclose(aggregated.maps().word("cat", res=mid_res), maps.word("cat", sites="mid_block.*"), atol=1e-5)
    with pytest.raises(LookupError, match="no captured"):
        aggregated.maps().word("cat", res=mid_res, exclude="mid_*")  # an explicit glob is strict
    with pytest.raises(ValueError, match="splits the summed map"):
        aggregated.maps().word("cat", exclude="up_blocks.*")  # up and down blocks share their sums
