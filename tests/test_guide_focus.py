"""Focus: one object's words inside a disk the image picks at its first guided pass."""

from __future__ import annotations

import math

import pytest
import torch

import xattn
from xattn.guide import Focus, Guide, GuidanceError, loss_from_dict


def two_blobs(first: tuple[int, int], second: tuple[int, int], heavy: float = 3.0) -> torch.Tensor:
    """A 16x16 map: one pixel of mass ``heavy`` at ``first`` and one of mass 1 at ``second``."""
    grid = torch.full((16, 16), 1e-9)
    grid[first] = heavy
    grid[second] = 1.0
    return grid


def test_the_disk_is_centred_on_the_peak_and_the_loss_is_the_share_outside():
    loss = Focus(["red", "circle"], radius=0.25)  # radius 4 pixels of 16
    maps = {"red": two_blobs((3, 3), (12, 12)), "circle": two_blobs((3, 4), (12, 12))}
    value = float(loss(maps, {}))
    # each word: 3 of its 4 units lie within 4 pixels of the summed peak, 1 unit 12 pixels away
    assert value == pytest.approx(0.25, abs=1e-6)


def test_the_disk_is_kept_for_the_run_once_chosen():
    loss, state = Focus("circle", radius=0.25), {}
    loss({"circle": two_blobs((3, 3), (12, 12))}, state)
    moved = {"circle": two_blobs((12, 12), (3, 3), heavy=3.0)}  # the peak has moved to the far blob
    assert float(loss(moved, state)) == pytest.approx(0.75, abs=1e-6)  # still measured around (3, 3)
    assert float(loss(moved, {})) == pytest.approx(0.25, abs=1e-6)  # a new image picks its own disk


def test_records_and_numbers():
    loss = Focus(["red", "circle"], radius=0.3, weight=2.0)
    again = loss_from_dict(loss.to_dict())
    assert isinstance(again, Focus) and again.to_dict() == loss.to_dict()
    for bad in (0, -0.1, math.nan, math.inf, 3):
        with pytest.raises(GuidanceError, match="Focus radius"):
            Focus("circle", radius=bad)
    with pytest.raises(GuidanceError, match="Focus"):
        Focus([])
    assert Guide(Focus("a"), refine={0: 0.0}).refine == {0: 0.0}  # its floor is 0
    with pytest.raises(GuidanceError, match="below 0.0"):
        Guide(Focus("a"), refine={0: -0.1})


def test_each_image_keeps_its_own_disk_so_a_batch_equals_its_images_alone(sd1_pipe):
    call = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                output_type="latent")

    def run(seeds):
        guide = Guide(Focus(["red", "circle"]), steps="0:3", step_size=20.0, res=None)
        with xattn.hooks(sd1_pipe, guide):
            return sd1_pipe(**call, num_images_per_prompt=len(seeds),
                            generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    alone = torch.cat([run([0]), run([1])])
    torch.testing.assert_close(run([0, 1]), alone, rtol=1e-4, atol=1e-4)
    plain = sd1_pipe(**call, num_images_per_prompt=2,
                     generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert not torch.allclose(alone, plain, atol=1e-4)  # the guidance moved the latents
