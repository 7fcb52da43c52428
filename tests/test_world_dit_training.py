"""The shapes-world transformer's training recipe computes what the shipped pipeline computes.

Training runs the transformer on one zero text row with log(256) added to its
logits instead of the pipeline's 256 zero rows that stand in for T5; these tests
hold that to the stock call in float64, check that the training text encoding is
the pipeline's own ``encode_prompt``, and that resuming is bit-exact.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import train_world_dit as recipe  # noqa: E402
from xattn.world.export import load_tokenizer  # noqa: E402
from xattn.world.models import make_dit, make_dit_text_encoders  # noqa: E402

CAPTIONS = ["a red circle", "a blue square and a green triangle"]


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return make_dit_text_encoders()


def ids_of(captions):
    return torch.tensor(load_tokenizer()(captions, padding="max_length", max_length=77).input_ids)


def test_one_biased_row_equals_the_pipelines_256_zero_rows_in_float64(encoders):
    torch.manual_seed(1)
    dit = make_dit(layers=2).double()
    for p in dit.parameters():  # away from the zero-initialised output layers, so every block matters
        p.data.normal_(0, 0.2)
    clip, pooled = (t.double() for t in recipe.encode_text(encoders, ids_of(CAPTIONS)))
    latents = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    t = torch.tensor([300.0, 800.0], dtype=torch.float64)
    with torch.no_grad():
        stock = dit(latents, recipe.with_t5_rows(clip), pooled, t).sample
        shim = recipe.OneRowForMany()
        with recipe.one_row_attention(shim):
            one = dit(latents, recipe.with_t5_rows(clip, rows=1), pooled, t).sample
        unbiased = dit(latents, recipe.with_t5_rows(clip, rows=1), pooled, t).sample  # the stock core, 1 row
    scale = stock.abs().max().item()
    assert (stock - one).abs().max().item() < 1e-10 * scale
    assert (stock - unbiased).abs().max().item() > 1e-3 * scale  # the row count matters, so the bias is doing it
    assert len(shim.probs) == 2 and shim.probs[0].shape == (2, 4, 64, 77)
    assert 0 < shim.probs[0].sum(-1).max().item() < 1  # image->CLIP share of a softmax over all keys


def test_training_text_is_the_pipelines_encode_prompt(tmp_path, encoders):
    from diffusers import StableDiffusion3Pipeline

    from xattn.world.export import save_dit_pipeline

    save_dit_pipeline(tmp_path / "pipe", recipe.shipped_vae(), encoders, make_dit(layers=1))
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe", text_encoder_3=None, tokenizer_3=None)
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False)
    clip, ours = recipe.encode_text([pipe.text_encoder, pipe.text_encoder_2], ids_of(CAPTIONS))
    assert embeds.shape == (2, 77 + recipe.T5_ROWS, 40)
    assert torch.equal(embeds, recipe.with_t5_rows(clip))
    assert torch.equal(pooled, ours)


def run_recipe(folder: Path, *extra: str) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "train_world_dit.py"), "--dir", str(folder), "--pool", "64", "--batch", "4",
         "--layers", "1", "--steps", "4", "--minutes", "5", "--log-every", "1", *extra],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


def test_resume_is_bit_exact_and_the_losses_are_real(tmp_path):
    whole = run_recipe(tmp_path / "whole")
    run_recipe(tmp_path / "split", "--stop-after", "2")
    run_recipe(tmp_path / "split", "--resume")
    a = torch.load(tmp_path / "whole" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4 and a["stage"] == b["stage"] == "done"
    for key in ("dit", "ema_dit", "te0", "te1"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    steps = re.findall(r"dit step \d+/4 flow ([\d.]+) share ([\d.]+) bce ([\d.]+) inv ([\d.]+)", whole)
    assert len(steps) == 4
    for flow, share, bce, inv in steps:
        assert float(flow) > 0 and 0 < float(share) <= 1 and 0 < float(bce) < 10 and float(inv) > 0
