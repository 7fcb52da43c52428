#!/usr/bin/env python
"""Train the shapes-world diffusion transformer (SD3-style joint attention, flow matching) on CPU.

Stages (one command runs both; --resume continues wherever it stopped):
  1. pool: a fixed, class-balanced pool of training scenes is encoded once with
           the shipped UNet model's VAE (the two models share their latent space).
  2. dit:  SD3Transformer2DModel + two CLIP text encoders jointly: rectified-flow
           loss (velocity target, logit-normal times), 10% empty captions for
           classifier-free guidance, a grounding loss on the image->text block of
           every joint attention, a colour-invariance loss on the text encodings
           and the pooled vector, EMA weights.
The text the transformer sees is the pipeline's: the penultimate CLIP layers
side by side, then the 256 zero rows that stand in for T5.  Those rows stay
identical through every block (SD3 gives text no positions), so training uses
one zero row whose key logit gets + log 256 in every attention, which is the
same function at a quarter of the cost (tests/test_world_dit.py checks it
against the stock 256-row call).  The same explicit attention keeps the
image->CLIP-text probabilities for the grounding loss.  The run
stops at --steps or when the --minutes wall budget (over all resumed runs) is
spent, then exports the EMA weights as a StableDiffusion3Pipeline folder.

  python scripts/train_world_dit.py --dir checkpoints/dit --export checkpoints/dit/final --minutes 95
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from train_world import (Progress, add_run_options, atomic_save, build_pool, colour_invariance, finish_stage, log,
                         open_run, optimiser_step, pool_batch, scheduled_lr)
from xattn.world import model_path
from xattn.world.data import grounding_targets
from xattn.world.export import load_tokenizer, save_dit_pipeline
from xattn.world.grounding import grounding_loss
from xattn.world.models import DIT_TEXT_DIM, make_dit, make_dit_text_encoders
from xattn.world.scenes import COLORS

T5_ROWS = 256  # StableDiffusion3Pipeline's default max_sequence_length: zeros when there is no T5


def shipped_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_path() / "vae")
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline reads it
    return vae


def encode_text(encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What StableDiffusion3Pipeline.encode_prompt computes without T5: ([b, 77, 40], pooled [b, 40])."""
    hidden, pooled = [], []
    for te in encoders:
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    return torch.cat(hidden, -1), torch.cat(pooled, -1)


def with_t5_rows(clip: torch.Tensor, rows: int = T5_ROWS) -> torch.Tensor:
    return torch.cat([clip, clip.new_zeros(clip.shape[0], rows, DIT_TEXT_DIM)], 1)


class OneRowForMany:
    """Stands in for ``torch.nn.functional`` inside the stock joint processor's module during training.

    Its ``scaled_dot_product_attention`` is explicit attention over [image, 77 CLIP
    rows, 1 zero row], with log(T5_ROWS) added to the zero row's logits so that
    the row counts as the pipeline's T5_ROWS identical ones.  The image->CLIP
    block of every map is kept in ``probs`` (with gradients) for grounding.
    """

    def __init__(self, clip_rows: int = 77):
        self.clip_rows = clip_rows
        self.probs: list[torch.Tensor] = []  # each [b, heads, image tokens, clip_rows]

    def __getattr__(self, name):
        return getattr(F, name)

    def scaled_dot_product_attention(self, q, k, v, dropout_p=0.0, is_causal=False, **unused):
        if unused or dropout_p or is_causal:
            raise ValueError(f"training attention got options it does not model: {sorted(unused)}")
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [b, h, s, s]
        bias = torch.zeros(k.shape[2], dtype=q.dtype)
        bias[-1] = math.log(T5_ROWS)
        probs = (logits + bias).softmax(-1)
        image = q.shape[2] - self.clip_rows - 1
        self.probs.append(probs[:, :, :image, image:image + self.clip_rows])
        return probs @ v


@contextmanager
def one_row_attention(shim: OneRowForMany):
    import diffusers.models.attention_processor as where

    real = where.F
    where.F = shim
    try:
        yield shim
    finally:
        where.F = real


def export(state: dict, folder: Path, use_ema: bool = True) -> None:
    encoders, dit = make_dit_text_encoders(), make_dit(**state["arch"])
    for k, te in enumerate(encoders):
        te.load_state_dict(state[("ema_te" if use_ema else "te") + str(k)])
    dit.load_state_dict(state["ema_dit" if use_ema else "dit"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_dit_pipeline(tmp, shipped_vae(), encoders, dit)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def train_dit(state: dict, args, clock) -> None:
    pool = torch.load(args.dir / "pool.pt")
    sf = state["scaling_factor"]
    torch.manual_seed(args.seed)
    encoders, dit = make_dit_text_encoders(), make_dit(**state["arch"])
    if "dit" in state:
        dit.load_state_dict(state["dit"])
        for k, te in enumerate(encoders):
            te.load_state_dict(state[f"te{k}"])
    ema_encoders, ema_dit = copy.deepcopy(encoders), copy.deepcopy(dit)
    if "ema_dit" in state:
        ema_dit.load_state_dict(state["ema_dit"])
        for k, te in enumerate(ema_encoders):
            te.load_state_dict(state[f"ema_te{k}"])
    params = list(dit.parameters()) + [p for te in encoders for p in te.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    shim = OneRowForMany()
    color_ids = torch.tensor(load_tokenizer().convert_tokens_to_ids([c + "</w>" for c in COLORS]))
    color_index = torch.full((49408,), -1, dtype=torch.long)
    color_index[color_ids] = torch.arange(len(color_ids))
    budget = args.minutes * 60 - 90  # leave time to export
    t0 = state.setdefault("dit_t0", clock())
    progress_log = Progress("dit", args.steps, ("flow", "share", "bce", "inv"), args.log_every, args.save_every, clock)

    def snapshot():
        state.update(dit=dit.state_dict(), ema_dit=ema_dit.state_dict(), opt=opt.state_dict(), elapsed=clock())
        for k in range(len(encoders)):
            state[f"te{k}"], state[f"ema_te{k}"] = encoders[k].state_dict(), ema_encoders[k].state_dict()

    def save():
        snapshot()
        atomic_save(state, args.dir / "state.pt")
        if args.export_latest:
            export(state, args.dir / "latest")

    def encode_with_pooled(ids):  # [b, 78, 40]: the 77 CLIP rows and the pooled vector
        clip, pooled = encode_text(encoders, ids)
        return torch.cat([clip, pooled[:, None]], 1)

    stop_at = state["step"] + args.stop_after if args.stop_after else args.steps
    while state["step"] < min(args.steps, stop_at) and clock() < budget:
        step = state["step"]
        lr = scheduled_lr(opt, args, step, args.steps, clock, t0, budget)
        gen, lat, ids, slots, idx = pool_batch(pool, step, args, sf)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal times, as SD3
        noise = torch.randn(lat.shape, generator=gen)
        s = sigma[:, None, None, None]
        noisy = (1 - s) * lat + s * noise

        shim.probs.clear()
        clip, pooled = encode_text(encoders, ids)
        with one_row_attention(shim):
            pred = dit(noisy, with_t5_rows(clip, rows=1), pooled, sigma * 1000).sample
        l_diff = F.mse_loss(pred, noise - lat)
        targets, valid = grounding_targets(pool["masks"][idx].float(), slots, resolutions=(8,))
        l_share, l_bce = grounding_loss(shim.probs, targets, valid)
        loss = l_diff + args.w_share * l_share + args.w_bce * l_bce
        l_inv = torch.zeros(())
        if args.w_inv > 0:
            enc = torch.cat([clip, pooled[:, None]], 1)
            l_inv = colour_invariance(encode_with_pooled, ids, enc, slots, color_ids, color_index, gen)
            loss = loss + args.w_inv * l_inv
        optimiser_step(opt, loss, params, ((ema_dit, dit), *zip(ema_encoders, encoders)), args.ema, step)
        state["step"] = step + 1
        progress_log.step_done(state["step"], (l_diff, l_share, l_bce, l_inv), lr, save)
    snapshot()
    finish_stage(state, state["step"] >= args.steps or clock() >= budget, args.dir / "state.pt", "dit", clock)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_options(ap, folder="checkpoints/dit", minutes=95.0, save_every=240.0, what="transformer")
    ap.add_argument("--pool", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=24)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--cond-drop", type=float, default=0.1)
    ap.add_argument("--w-share", type=float, default=0.1)
    ap.add_argument("--w-bce", type=float, default=0.1)
    ap.add_argument("--w-inv", type=float, default=0.1,
                    help="weight of the colour-invariance loss (non-colour text rows and the pooled vector)")
    args = ap.parse_args(argv)

    def fresh() -> dict:
        arch = dict(layers=args.layers, heads=args.heads, head_dim=args.head_dim)
        return dict(stage="pool", step=0, elapsed=0.0, arch=arch, args=vars(args))

    state, clock = open_run(args, fresh)
    path = args.dir / "state.pt"
    if state["stage"] == "pool":
        vae = shipped_vae()
        build_pool(state, vae, args)  # the VAE is fixed: keep its own scaling factor
        state.update(stage="dit", step=0, elapsed=clock(), scaling_factor=vae.config.scaling_factor)
        atomic_save(state, path)
    if state["stage"] == "dit":
        train_dit(state, args, clock)
    if args.export is not None and state["stage"] == "done":
        export(state, args.export)
        log(f"exported EMA pipeline to {args.export}; total {clock() / 60:.1f} min")


if __name__ == "__main__":
    main()
