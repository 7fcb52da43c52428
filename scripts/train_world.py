#!/usr/bin/env python
"""Train the shapes-world mini Stable Diffusion from scratch on CPU.

Stages (one command runs both, --resume continues wherever it stopped):
  1. vae:  AutoencoderKL on rendered scenes (L1 + MSE + tiny KL); then a fixed
           pool of training scenes is encoded once to latents.
  2. unet: UNet2DConditionModel + CLIPTextModel jointly: epsilon loss with
           min-SNR weighting, 10% empty captions (for classifier-free
           guidance), a cross-attention grounding loss, EMA weights.
The run stops at --unet-steps or when the --minutes wall budget (counted over
all resumed runs) is spent, then exports the EMA weights as a diffusers folder.

  python scripts/train_world.py --dir checkpoints/world --export checkpoints/world/final --minutes 75
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from xattn.world.data import grounding_targets, image_to_tensor, mask_fraction, object_slots
from xattn.world.export import load_tokenizer, save_pipeline
from xattn.world.grounding import grounding_loss, install
from xattn.world.models import make_text_encoder, make_train_scheduler, make_unet, make_vae
from xattn.world.scenes import COLORS, make_scene

VAE_SEED_BASE = 5_000_000
POOL_SEED_BASE = 1_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cosine_lr(peak: float, progress: float, warm: float) -> float:
    """Linear warm-up over the first ``warm`` steps' worth, then cosine to 5%."""
    if progress < warm:
        return peak * max(progress / warm, 0.02)
    p = min(1.0, (progress - warm) / max(1e-9, 1 - warm))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def vae_batch(seed: int, step: int, size: int) -> torch.Tensor:
    base = VAE_SEED_BASE + seed * 100_000 + step * size
    return image_to_tensor(np.stack([make_scene(base + i).image for i in range(size)]))


def train_vae(state: dict, args, clock) -> None:
    vae = make_vae()
    vae.load_state_dict(state["vae"])
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    if state.get("vae_opt"):
        opt.load_state_dict(state["vae_opt"])
    last_save = time.time()
    run = []
    while state["step"] < args.vae_steps:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(args.vae_lr, step / args.vae_steps, 0.05)
        x = vae_batch(args.seed, step, args.vae_batch)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=torch.Generator().manual_seed(step))).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean()
        loss = l1 + mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        state["step"] = step + 1
        run.append((l1.item(), mse.item(), kl.item()))
        if state["step"] % 25 == 0:
            a = np.mean(run, 0)
            run = []
            log(f"vae step {state['step']}/{args.vae_steps} l1 {a[0]:.4f} mse {a[1]:.5f} "
                f"kl {a[2]:.1f} elapsed {clock() / 60:.1f} min")
        if time.time() - last_save > args.save_every:
            state["vae"], state["vae_opt"], state["elapsed"] = vae.state_dict(), opt.state_dict(), clock()
            atomic_save(state, args.dir / "state.pt")
            last_save = time.time()
    state["vae"], state["vae_opt"] = vae.state_dict(), None
    build_pool(state, vae, args)
    state.update(stage="unet", step=0, elapsed=clock())
    atomic_save(state, args.dir / "state.pt")
    log("vae stage done")


@torch.no_grad()
def build_pool(state: dict, vae, args) -> None:
    """Encode a fixed, class-balanced pool of training scenes once."""
    tok = load_tokenizer()
    cache: dict[str, list[int]] = {}
    lat, masks, slots, ids = [], [], [], []
    vae.eval()
    for start in range(0, args.pool, 256):
        scenes = [make_scene(POOL_SEED_BASE + args.seed * 100_000 + i, split="train")
                  for i in range(start, min(start + 256, args.pool))]
        lat.append(vae.encode(image_to_tensor(np.stack([s.image for s in scenes]))).latent_dist.mean)
        for s in scenes:
            m = np.zeros((2, 16, 16), np.float32)
            sl = np.full((2, 2), -1, np.int64)
            for k, (obj, slot) in enumerate(zip(s.objects, object_slots(s))):
                m[k] = mask_fraction(obj.mask, 16)
                sl[k] = slot
            if s.caption not in cache:
                cache[s.caption] = tok(s.caption, padding="max_length", max_length=77).input_ids
            masks.append(m)
            slots.append(sl)
            ids.append(cache[s.caption])
    lat = torch.cat(lat)  # [n, 4, 16, 16]
    sf = float(1.0 / lat.std())
    state["scaling_factor"] = sf
    pool = dict(lat=lat, masks=torch.from_numpy(np.stack(masks)).half(),
                slots=torch.from_numpy(np.stack(slots)), ids=torch.tensor(ids),
                empty=torch.tensor(tok("", padding="max_length", max_length=77).input_ids))
    atomic_save(pool, args.dir / "pool.pt")
    log(f"pool of {len(lat)} scenes encoded; latent std {lat.std():.3f} -> scaling {sf:.3f}")


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def optimiser_step(opt, loss: torch.Tensor, params, ema_pairs, ema: float, step: int) -> None:
    """Backward, clip the gradient norm to 1, step; then each EMA copy follows its model (decay warms up)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(ema, (1 + step) / (10 + step))
    for averaged, model in ema_pairs:
        ema_update(averaged, model, decay)


class Progress:
    """The loop's bookkeeping: running means of the loss terms logged every ``every`` steps, and a
    checkpoint (``save()``) every ``save_every`` seconds of wall time."""

    def __init__(self, stage: str, total: int, names: tuple[str, ...], every: int, save_every: float, clock):
        self.stage, self.total, self.names, self.every = stage, total, names, every
        self.save_every, self.clock = save_every, clock
        self.values: list[tuple[float, ...]] = []
        self.last_save = self.last_log = time.time()

    def step_done(self, step: int, losses: tuple[torch.Tensor, ...], lr: float, save) -> None:
        self.values.append(tuple(x.item() for x in losses))
        if step % self.every == 0:
            means = np.mean(self.values, 0)
            self.values = []
            seconds = (time.time() - self.last_log) / self.every
            self.last_log = time.time()
            terms = " ".join(f"{name} {value:.4f}" for name, value in zip(self.names, means))
            log(f"{self.stage} step {step}/{self.total} {terms} lr {lr:.2e} {seconds:.2f} s/step "
                f"elapsed {self.clock() / 60:.1f} min")
        if time.time() - self.last_save > self.save_every:
            save()
            self.last_save = time.time()
            log(f"checkpoint at step {step}")


def add_run_options(ap: argparse.ArgumentParser, *, folder: str, minutes: float, save_every: float,
                    what: str) -> None:
    """The options every training script shares: its folder, resuming, threads, wall budget, EMA, logs, checkpoints."""
    ap.add_argument("--dir", type=Path, default=Path(folder))
    ap.add_argument("--export", type=Path, default=None, help="pipeline folder to write at the end")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=minutes, help="wall budget over all runs")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every", type=float, default=save_every, help="seconds")
    ap.add_argument("--export-latest", action="store_true",
                    help="also export the EMA pipeline to DIR/latest at each checkpoint")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--stop-after", type=int, default=0,
                    help=f"end this invocation after N more {what} steps (testing resume)")


def open_run(args, fresh: Callable[[], dict]) -> tuple[dict, Callable[[], float]]:
    """The run's state (resumed from DIR/state.pt, or ``fresh()``) and its clock: seconds over all invocations."""
    torch.set_num_threads(args.threads)
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "state.pt"
    if args.resume and path.exists():
        state = torch.load(path, weights_only=False)
        log(f"resumed: stage {state['stage']} step {state['step']} elapsed {state['elapsed'] / 60:.1f} min")
    else:
        state = fresh()
        log(f"fresh run: {' '.join(sys.argv)}")
    started, before = time.time(), state["elapsed"]
    return state, lambda: before + time.time() - started


def scheduled_lr(opt, args, step: int, total: int, clock, t0: float, budget: float) -> float:
    """Set and return the step's learning rate: warm-up, then cosine, driven by steps or wall time, whichever is further."""
    progress = max(step / total, (clock() - t0) / max(1.0, budget - t0))
    lr = cosine_lr(args.lr, progress, args.warmup / total)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def pool_batch(pool: dict, step: int, args, scaling: float):
    """Step ``step``'s batch: (generator, latents [b, 4, 16, 16], token ids [b, 77], word slots [b, 2, 2], indices).

    The generator is seeded by the step, so a resumed run draws what an unbroken
    one would; ``cond_drop`` of the captions are emptied (classifier-free guidance).
    """
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    idx = torch.randint(len(pool["lat"]), (args.batch,), generator=gen)
    ids, slots = pool["ids"][idx].clone(), pool["slots"][idx].clone()
    drop = torch.rand(args.batch, generator=gen) < args.cond_drop
    ids[drop] = pool["empty"]
    slots[drop] = -1
    return gen, pool["lat"][idx] * scaling, ids, slots, idx


def finish_stage(state: dict, done: bool, path: Path, stage: str, clock) -> None:
    """Mark the stage done when its steps or the wall budget are spent, and save the state."""
    if done:
        state["stage"] = "done"
    atomic_save(state, path)
    log(f"{stage} stage stopped at step {state['step']} after {clock() / 60:.1f} min")


def export(state: dict, folder: Path, use_ema: bool = True) -> None:
    vae = make_vae()
    vae.load_state_dict(state["vae"])
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    te, unet = make_text_encoder(), make_unet()
    te.load_state_dict(state["ema_te" if use_ema else "te"])
    unet.load_state_dict(state["ema_unet" if use_ema else "unet"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline(tmp, vae, te, unet)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def colour_invariance(encode, ids, enc, slots, color_ids, color_index, gen) -> torch.Tensor:
    """How much colour leaks into the other token encodings, relative to the colour word.

    Why: the causal text encoder copies "red" into the shape, "and" and
    end/padding tokens, so zeroing the colour word's attention leaves the colour
    in place.  Each caption is re-encoded with its colour words swapped; the
    largest change at any non-colour position is divided by the change at the
    colour words themselves (``encode``: token ids -> [b, n >= 77, d] encodings,
    positions past 77 such as a pooled vector count as non-colour).  The ratio cannot be lowered by shrinking all
    colour differences (an absolute penalty can, and the UNet then amplifies
    the faint leak), only by keeping colour in the colour token alone.
    """
    swapped = ids.clone()  # [b, 77]
    is_color = torch.zeros(ids.shape, dtype=torch.bool)  # [b, 77]
    for obj in range(slots.shape[1]):
        s = slots[:, obj, 0]
        ok = s >= 0
        rows = torch.nonzero(ok).squeeze(1)
        cur = color_index[ids[rows, s[ok]]]
        shift = torch.randint(1, len(color_ids), (len(rows),), generator=gen)
        swapped[rows, s[ok]] = color_ids[(cur + shift) % len(color_ids)]
        is_color[rows, s[ok]] = True
    named = is_color.any(1)
    if not named.any():
        return enc.new_zeros(())
    other = encode(swapped[named])  # [n, positions, hidden]
    d = ((enc[named] - other) ** 2).mean(-1)  # [n, positions]
    is_color = F.pad(is_color, (0, d.shape[1] - is_color.shape[1]))
    col = is_color[named].float()
    at_color = (d * col).sum(1) / col.sum(1)  # [n]
    leak = d.masked_fill(is_color[named], 0.0).max(1).values  # [n]
    return (leak / (at_color + 1e-3)).mean()


def train_unet(state: dict, args, clock) -> None:
    pool = torch.load(args.dir / "pool.pt")
    sf = state["scaling_factor"]
    torch.manual_seed(args.seed)
    te, unet = make_text_encoder(), make_unet()
    if "unet" in state:
        te.load_state_dict(state["te"])
        unet.load_state_dict(state["unet"])
    ema_te, ema_unet = copy.deepcopy(te), copy.deepcopy(unet)
    if "ema_unet" in state:
        ema_te.load_state_dict(state["ema_te"])
        ema_unet.load_state_dict(state["ema_unet"])
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    store = install(unet)
    sched = make_train_scheduler()
    color_ids = torch.tensor(load_tokenizer().convert_tokens_to_ids([c + "</w>" for c in COLORS]))
    color_index = torch.full((49408,), -1, dtype=torch.long)
    color_index[color_ids] = torch.arange(len(color_ids))
    acp = sched.alphas_cumprod
    budget = args.minutes * 60 - 90  # leave time to export
    unet_t0 = state.get("unet_t0", clock())
    state["unet_t0"] = unet_t0
    progress_log = Progress("unet", args.unet_steps, ("diff", "share", "bce", "inv"), args.log_every,
                            args.save_every, clock)

    def snapshot():
        state.update(te=te.state_dict(), unet=unet.state_dict(), ema_te=ema_te.state_dict(),
                     ema_unet=ema_unet.state_dict(), opt=opt.state_dict(), elapsed=clock())

    def save():
        snapshot()
        atomic_save(state, args.dir / "state.pt")
        if args.export_latest:
            export(state, args.dir / "latest")

    stop_at = state["step"] + args.stop_after if args.stop_after else args.unet_steps
    while state["step"] < min(args.unet_steps, stop_at) and clock() < budget:
        step = state["step"]
        lr = scheduled_lr(opt, args, step, args.unet_steps, clock, unet_t0, budget)
        gen, lat, ids, slots, idx = pool_batch(pool, step, args, sf)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        noise = torch.randn(lat.shape, generator=gen)
        noisy = sched.add_noise(lat, noise, t)

        store.clear()
        enc = te(ids).last_hidden_state  # [b, 77, hidden]
        pred = unet(noisy, t, enc).sample
        snr = acp[t] / (1 - acp[t])
        w = torch.clamp(snr, max=args.snr_gamma) / snr
        l_diff = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * w).mean()
        targets, valid = grounding_targets(pool["masks"][idx].float(), slots)
        l_share, l_bce = grounding_loss(store.probs, targets, valid)
        loss = l_diff + args.w_share * l_share + args.w_bce * l_bce
        l_inv = torch.zeros(())
        if args.w_inv > 0 and step >= args.inv_from:
            l_inv = colour_invariance(lambda x: te(x).last_hidden_state, ids, enc, slots, color_ids, color_index, gen)
            loss = loss + args.w_inv * l_inv
        optimiser_step(opt, loss, params, ((ema_unet, unet), (ema_te, te)), args.ema, step)
        state["step"] = step + 1
        progress_log.step_done(state["step"], (l_diff, l_share, l_bce, l_inv), lr, save)
    snapshot()
    finish_stage(state, state["step"] >= args.unet_steps or clock() >= budget, args.dir / "state.pt", "unet", clock)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_options(ap, folder="checkpoints/world", minutes=75.0, save_every=180.0, what="UNet")
    ap.add_argument("--stage", choices=["vae", "all"], default="all",
                    help="vae: stop after the VAE stage and pool")
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae-kl", type=float, default=1e-6)
    ap.add_argument("--pool", type=int, default=32768)
    ap.add_argument("--unet-steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--cond-drop", type=float, default=0.1)
    ap.add_argument("--snr-gamma", type=float, default=5.0)
    ap.add_argument("--w-share", type=float, default=0.1)
    ap.add_argument("--w-bce", type=float, default=0.1)
    ap.add_argument("--w-inv", type=float, default=0.0,
                    help="weight of the colour-invariance loss on non-colour token encodings")
    ap.add_argument("--inv-from", type=int, default=0, help="UNet step where --w-inv starts")
    args = ap.parse_args(argv)

    def fresh() -> dict:
        torch.manual_seed(args.seed)
        return dict(stage="vae", step=0, elapsed=0.0, vae=make_vae().state_dict(), args=vars(args))

    state, clock = open_run(args, fresh)
    if state["stage"] == "vae":
        train_vae(state, args, clock)
    if args.stage == "vae":
        return
    if state["stage"] == "unet":
        train_unet(state, args, clock)
    if args.export is not None and state["stage"] == "done":
        export(state, args.export)
        log(f"exported EMA pipeline to {args.export}; total {clock() / 60:.1f} min")


if __name__ == "__main__":
    main()
