"""A small, fixed-seed evaluation of the shipped model against ground truth.

Thresholds sit a little under the full evaluation figures in the model card
(scripts/eval_world.py), so a regression in the model, the world, the
tokenizer alignment or the guidance batch order makes this fail.
"""
import pytest

from xattn.world import heldout_prompts
from xattn.world.measure import generation_scores, localisation_scores, reweight_curve

# Full evaluation (model card): win rate 0.992, IoU own 0.722 vs other 0.007,
# colour 0.958, shape 0.927, both colours 0.984, weight-0 colour pixels 0.457.
# This small run measured 1.000, 0.756 vs 0.001, 0.944, 1.000, 1.000, 0.197.
WIN_MIN = 0.95
IOU_MIN = 0.60
COLOR_MIN = 0.85
SHAPE_MIN = 0.85
BOTH_MIN = 0.85
ZERO_MAX = 0.50  # zeroing a colour word keeps at most half its pixels


def test_localisation_on_heldout_scenes(world_pipe):
    loc = localisation_scores(world_pipe, n=8)
    assert loc.win_rate >= WIN_MIN
    assert loc.iou_own >= IOU_MIN
    assert loc.iou_own >= 5 * loc.iou_other


@pytest.mark.slow
def test_generation_on_heldout_prompts(world_pipe, world_defaults):
    singles, pairs = heldout_prompts(n_pair=4)
    g, steps = world_defaults["guidance_scale"], world_defaults["num_inference_steps"]
    s = generation_scores(world_pipe, list(range(6)), g, steps, singles=singles, pairs=[])
    p = generation_scores(world_pipe, list(range(3)), g, steps, singles=[], pairs=pairs)
    assert s.color_acc >= COLOR_MIN
    assert s.shape_acc >= SHAPE_MIN
    assert p.both_colors >= BOTH_MIN


@pytest.mark.slow
def test_zeroing_a_colour_word_removes_its_colour(world_pipe, world_defaults):
    _, pairs = heldout_prompts(n_pair=2)
    curve = reweight_curve(world_pipe, pairs, [0, 1, 2], world_defaults["guidance_scale"],
                           world_defaults["num_inference_steps"], weights=(0.0, 1.0))
    assert curve[0.0] <= ZERO_MAX


def test_capture_word_maps_equal_the_training_probes(world_pipe):
    """Localisation reads maps through xattn's Capture; the same maps from the training probe, by hand, agree."""
    import torch
    import torch.nn.functional as F

    from xattn.world import heldout_scenes
    from xattn.world.data import image_to_tensor, object_slots
    from reference import install_probe
    from xattn.world.measure import scene_word_maps

    pipe, scene, timesteps = world_pipe, heldout_scenes(1)[0], (300, 700)
    slots = [slot for pair in object_slots(scene) for slot in pair]
    maps = scene_word_maps(pipe, scene, slots, timesteps, seed=5)
    saved = pipe.unet.attn_processors
    store = install_probe(pipe.unet)  # explicit softmax(QK^T * scale) at every attn2, kept per call
    try:
        with torch.no_grad():
            ids = pipe.tokenizer(scene.caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
            text = pipe.text_encoder(ids)[0]
            latent = pipe.vae.encode(image_to_tensor(scene.image[None])).latent_dist.mean
            latent = latent * pipe.vae.config.scaling_factor
            gen = torch.Generator().manual_seed(5)
            total, count = torch.zeros(77, 64, 64, dtype=torch.float64), 0
            for t in timesteps:  # one call per timestep, the noise drawn in the same order
                noisy = pipe.scheduler.add_noise(latent, torch.randn(latent.shape, generator=gen), torch.tensor([t]))
                store.clear()
                pipe.unet(noisy, torch.tensor([t]), text)
                for probs in store.probs:  # [1, heads, i, 77]
                    side = int(round(probs.shape[2] ** 0.5))
                    if side in (16, 8):
                        grid = probs[0].double().mean(0).T.reshape(77, 1, side, side)
                        total += F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
                        count += 1
    finally:
        pipe.unet.set_attn_processor(saved)
    for slot in slots:
        reference = (total[slot] / count).numpy()
        assert abs(maps[slot] - reference).max() <= 1e-5 * reference.max(), slot
