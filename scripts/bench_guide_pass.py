#!/usr/bin/env python
"""One guidance gradient pass on a Stable Diffusion 1.x UNet: whole, and stopped after the guide's last map.

``Guide`` reads Attend-and-Excite's 16x16 and 8x8 maps. At 512² on SD 1.x
they end in the second of the four up blocks, so a gradient pass may stop
there (``xattn.steering.EnoughRead``): the two largest up blocks never run,
forward or backward. This script times that on a UNet with SD 1.5's
configuration (random weights: the cost does not depend on them) and a
one-layer text encoder of SD 1.5's width, so that no checkpoint is needed.
Rounds interleave the two variants; the table gives medians and their ratio.

    python scripts/bench_guide_pass.py                 # 512², 2 rounds, 2 threads
    python scripts/bench_guide_pass.py --size 256 --rounds 3

Run it on an otherwise idle machine; the figures go to docs/guidance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd15_shaped_pipeline(widths=SD15_UNET["block_out_channels"]):
    """SD 1.5's UNet and text width with random weights, the shapes world's tokenizer, scheduler and VAE."""
    import xattn
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    world = StableDiffusionPipeline.from_pretrained(xattn.world.model_path())
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                                        num_attention_heads=12, vocab_size=world.tokenizer.vocab_size,
                                        max_position_embeddings=77))
    pipe = StableDiffusionPipeline(vae=world.vae, text_encoder=text, tokenizer=world.tokenizer,
                                   unet=UNet2DConditionModel(**SD15_UNET | {"block_out_channels": tuple(widths)}),
                                   scheduler=world.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in SD pixels (latents: size / 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", default="320,640,1280,1280", help="the UNet's block widths (SD 1.5's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import xattn
    import xattn.guide.controller as controller
    from xattn.guide import Excite, Guide

    pipe = sd15_shaped_pipeline([int(w) for w in args.widths.split(",")])
    latent = args.size // 8
    side = latent * pipe.vae_scale_factor  # the world VAE's factor, so the latents are SD's at --size
    whole_loss = controller.Guide._loss
    grad = torch.autograd.grad
    passes: list[float] = []  # seconds of each gradient pass after the run's first: forward and backward
    reached_end: list[int] = []  # one entry per gradient pass that ran the UNet's last layer
    run = {"whole": False, "first": True, "started": None}  # the variant, and the pass being timed

    def count_end(*_):
        if torch.is_grad_enabled():
            reached_end.append(1)

    def timed_loss(self, *a, **k):
        if run["first"]:  # the run's first pass counts the guide's maps: not timed
            run["first"] = False
            return whole_loss(self, *a, **k)
        if run["whole"]:
            self._reads_per_pass = None  # forget the count: this pass runs to the end
        run["started"] = time.perf_counter()
        return whole_loss(self, *a, **k)

    def timed_grad(*a, **k):
        result = grad(*a, **k)
        if run["started"] is not None:  # the backward ends the pass
            passes.append(time.perf_counter() - run["started"])
            run["started"] = None
        return result

    pipe.unet.conv_out.register_forward_hook(count_end)
    controller.Guide._loss, torch.autograd.grad = timed_loss, timed_grad
    try:
        seconds = {"whole": [], "stopped": []}
        ends = {}
        for round_ in range(args.rounds):
            for variant in seconds:
                guide = Guide(Excite(["red", "circle"]), steps="0:1", step_size=20.0, refine={0: 0.0}, max_refine=2)
                run.update(whole=variant == "whole", first=True, started=None)
                del passes[:], reached_end[:]
                with xattn.hooks(pipe, guide):
                    pipe("a red circle", num_inference_steps=1, guidance_scale=7.5, height=side, width=side,
                         output_type="latent", generator=torch.Generator().manual_seed(0))
                seconds[variant].append(statistics.median(passes))
                ends[variant] = len(reached_end)
                print(f"round {round_ + 1}/{args.rounds} {variant}: {seconds[variant][-1]:.2f} s/pass "
                      f"({len(passes)} timed passes)", flush=True)
    finally:  # the timers go; the library is as it was
        controller.Guide._loss, torch.autograd.grad = whole_loss, grad
    median = {variant: statistics.median(values) for variant, values in seconds.items()}
    print(f"\nSD 1.5 UNet layout, widths {args.widths} (random weights), {args.size}² ({latent}x{latent} latents), "
          f"Guide(Excite) on res=16,8, {args.threads} thread(s), medians of {args.rounds} rounds")
    print("gradient pass         s/pass  x whole  passes reaching the last layer")
    for variant in seconds:
        print(f"{variant:<20}  {median[variant]:6.2f}  {median[variant] / median['whole']:7.2f}  {ends[variant]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
