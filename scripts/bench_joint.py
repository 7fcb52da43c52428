"""Per-step cost of xattn on a joint-attention transformer (Flux, SD3) at its real width, reduced depth.

Used by ``scripts/bench_overhead.py --model flux`` / ``--model sd3`` (see its
help). The transformer has the released models' width and head layout (Flux.1:
3072 = 24 heads x 128, a 4096-wide T5 text; SD3 medium: 1536 = 24 x 64) but one
double- and one single-stream block (Flux) or two joint blocks (SD3), random
weights. One step is one transformer call at a fixed timestep, on the token
counts of a 512^2 and a 1024^2 image (Flux: 1024 / 4096 image tokens and 512
text tokens, batch 1: guidance-distilled; SD3: the same image tokens, 333 text
tokens = 77 CLIP + 256 T5, a guidance batch of 2). Variants run interleaved,
round after round; medians and ratios to stock come from the same run.

attention-map-diffusers (``pip install attention-map-diffusers==1.0.0``), when
importable, is measured in the same rounds for the same capture: every layer's
image->text map, heads averaged, in its default ``fast`` mode (it stores each
layer's queries and keys and builds the maps in ``compute()``, timed as its own
variant) and its ``exact`` mode. "bytes held" is what each capture keeps after
the step (xattn: its running sums; attention-map-diffusers: its collector's
``capture_bytes``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from types import SimpleNamespace
from typing import Callable

import torch

import xattn
from xattn.hookpoints import BatchLayout, Row

IMAGE_TOKENS = {512: 1024, 1024: 4096}  # image side -> tokens (16x down: VAE 8x, then 2x2 patches / packing)
SPECS = {
    "flux": dict(text=512, batch=1, label="Flux.1 width (3072 = 24 x 128), 1 double + 1 single block"),
    "sd3": dict(text=333, batch=2, label="SD3 medium width (1536 = 24 x 64), 2 joint blocks"),
}


def build(model: str, quick: bool):
    """The transformer, random weights, eval mode; ``quick``: the same blocks at a tiny width."""
    torch.manual_seed(0)
    if model == "flux":
        from diffusers import FluxTransformer2DModel

        heads, dim, text = (2, 16, 32) if quick else (24, 128, 4096)
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                      attention_head_dim=dim, num_attention_heads=heads, joint_attention_dim=text,
                                      pooled_projection_dim=768, guidance_embeds=True,
                                      axes_dims_rope=(2, 6, 8) if quick else (16, 56, 56)).eval()
    from diffusers import SD3Transformer2DModel

    heads, dim, text = (2, 16, 32) if quick else (24, 64, 4096)
    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=dim,
                                 num_attention_heads=heads, joint_attention_dim=text, caption_projection_dim=heads * dim,
                                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192).eval()


def inputs(model: str, transformer, image_tokens: int, text_tokens: int, batch: int, device, dtype) -> dict:
    side = int(image_tokens ** 0.5)
    generator = torch.Generator().manual_seed(0)
    text_dim = transformer.config.joint_attention_dim

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if model == "flux":
        ids = torch.zeros(side, side, 3)
        ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
        return dict(hidden_states=randn(batch, image_tokens, 64), encoder_hidden_states=randn(batch, text_tokens, text_dim),
                    pooled_projections=randn(batch, 768), timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                    guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
                    img_ids=ids.view(-1, 3).to(device), txt_ids=torch.zeros(text_tokens, 3, device=device))
    return dict(hidden_states=randn(batch, 16, 2 * side, 2 * side), encoder_hidden_states=randn(batch, text_tokens, text_dim),
                pooled_projections=randn(batch, 2048), timestep=torch.full((batch,), 500.0, device=device, dtype=dtype))


class Schedule:
    """Stands in for a scheduler: the step clock reads ``timesteps`` (Flux's call gets t / 1000)."""

    def __init__(self, model: str):
        self.timesteps = torch.tensor([1000.0, 500.0, 1.0] if model == "flux" else [999.0, 500.0, 1.0])


class Variant:
    """A context manager factory for one way of running the step, and what it holds afterwards."""

    def __init__(self, enter: Callable[[], contextlib.AbstractContextManager], held: Callable[[], object] = None,
                 after: Callable[[], None] | None = None):
        self.enter, self.held, self.after = enter, held or (lambda: "-"), after


def _amd_variants(transformer, quick: bool) -> dict[str, Variant]:
    try:
        import attention_map_diffusers as amd
    except ImportError:
        return {}
    host = SimpleNamespace(transformer=transformer)  # what AttentionCapture reads from a pipeline
    found = {}
    for mode in ("fast", "exact"):
        capture = {"now": None}

        def enter(mode=mode, capture=capture):
            capture["now"] = amd.AttentionCapture(host, relations="image->text", layers="all", timesteps="all",
                                                  heads="mean", mode=mode, offload=None)
            return capture["now"]

        found[f"attention-map-diffusers {amd.__version__} capture ({mode})"] = Variant(
            enter, lambda capture=capture: capture["now"].collector.capture_bytes)
        if mode == "fast":  # the maps themselves are built after the run: time that too
            found[f"attention-map-diffusers {amd.__version__} capture (fast) + compute()"] = Variant(
                enter, lambda capture=capture: capture["now"].collector.capture_bytes,
                after=lambda capture=capture: capture["now"].compute())
    return found


def variants(model: str, transformer, layout: BatchLayout, schedule, quick: bool) -> dict[str, Variant]:
    def session(*make):
        made = {}

        def enter():
            made["controllers"] = [m() for m in make]
            return xattn.hooks(transformer, *made["controllers"], scheduler=schedule, layout=layout)

        def held():
            sizes = [c.bytes_held() for c in made.get("controllers", []) if hasattr(c, "bytes_held")]
            return sum(sizes) if sizes else "-"

        return Variant(enter, held)

    def sources(ctx) -> torch.Tensor:  # each row's source row: prompt 1 (the target) reads prompt 0's same row
        rows = ctx.layout.rows
        return torch.tensor([rows.index(Row(row.cond, 0, row.image)) if row.prompt == 1 else r
                             for r, row in enumerate(rows)])

    def copy_source_block(probs, ctx):  # prompt-to-prompt's cross replacement: the target row takes the source's map
        return probs[sources(ctx).to(probs.device)]

    def borrow_rows(rows, ctx):  # self-attention injection: the target row attends with the source row's map
        return sources(ctx)

    found = {
        "stock processors": Variant(contextlib.nullcontext),
        "xattn, no hooks": session(),
        "xattn, capture aggregated (image->text of every joint layer)": session(lambda: xattn.Capture(slots="all")),
        "xattn, fused reweight (Reweight scale on a token)": session(lambda: xattn.Reweight({5: 0.5}, mode="scale")),
        "xattn, edit batch (image->text copied from the source row + map_rows injection)": session(
            lambda: xattn.Hook("probs", copy_source_block, "kind=joint"),
            lambda: xattn.Hook("map_rows", borrow_rows, "kind=joint")),
    }
    found.update(_amd_variants(transformer, quick))
    return found


def run(args, PeakMemory) -> None:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    spec = SPECS[args.model]
    transformer = build(args.model, args.quick)
    if (device.type, dtype) != ("cpu", torch.float32):
        transformer = transformer.to(device=device, dtype=dtype)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([512] if args.quick else [512, 1024])
    schedule = Schedule(args.model)
    print(f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, xattn {xattn.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}{' ' + torch.cuda.get_device_name(device) if cuda else ''}")
    print(f"{spec['label']}{' (QUICK: tiny width)' if args.quick else ''}, random weights, {dtype}, "
          f"{args.repeats} interleaved rounds\n")
    for size in sizes:
        image = 64 if args.quick else IMAGE_TOKENS[size]
        text = 32 if args.quick else spec["text"]
        batch = spec["batch"]
        rows = (Row(True, 0, 0),) if args.model == "flux" else (Row(False, 0, 0), Row(True, 0, 0))
        table_variants = variants(args.model, transformer, BatchLayout(rows=rows), schedule, args.quick)
        edit_rows = tuple(Row(True, p, 0) for p in range(2))  # source and target (Flux: no unconditional rows)
        if args.model == "sd3":
            edit_rows = (Row(False, 0, 0), Row(True, 0, 0), Row(False, 1, 0), Row(True, 1, 0))
        plain = inputs(args.model, transformer, image, text, batch, device, dtype)
        edit = inputs(args.model, transformer, image, text, len(edit_rows), device, dtype)
        edit_name = next(name for name in table_variants if name.startswith("xattn, edit batch"))
        edit_variants = {"stock processors (edit batch)": Variant(contextlib.nullcontext),
                         edit_name: variants(args.model, transformer, BatchLayout(rows=edit_rows), schedule,
                                             args.quick)[edit_name]}
        del table_variants[edit_name]
        if args.only:  # stock always runs; the edit table only if a wanted substring names its variant
            wanted = [w.strip() for w in args.only.split(",")]
            table_variants = {k: v for k, v in table_variants.items() if k.startswith("stock") or
                              any(w in k for w in wanted)}
            if not any(w in edit_name for w in wanted):
                edit_variants = {}
        print(f"### {size}x{size}: {image} image tokens, {text} text tokens, batch {batch} "
              f"(edit batch: {len(edit_rows)} rows)\n")
        rows_out = measure(transformer, table_variants, plain, args.repeats, device, PeakMemory)
        if edit_variants:
            rows_out += measure(transformer, edit_variants, edit, args.repeats, device, PeakMemory)
        print(f"| variant | median s/step | {RATIO_HEADER} | {SHARED_HEADER} | bytes held | step peak MiB | peak ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for line in rows_out:
            print(line)
        print()


RATIO_HEADER = "ratio to stock (median of rounds) | fastest / stock's fastest"
SHARED_HEADER = "ratio, linear layers' time shared | linear s/step"


def timed_rounds(variants: dict, step: Callable, repeats: int) -> dict[str, list[float]]:
    """Seconds of ``step(variant)``, round after round; each round starts one variant later than the one
    before, so that no variant is always the first of a round (the one that pays for what the last left)."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(step(variants[name]))
    return times


def round_ratios(times: dict[str, list[float]], stock: str) -> dict[str, float]:
    """Each variant's median over rounds of its time / stock's time in the same round (drift between
    rounds cancels in each ratio)."""
    return {name: statistics.median(t / s for t, s in zip(values, times[stock])) for name, values in times.items()}


def ratio_cells(times: dict[str, list[float]], stock: str) -> dict[str, str]:
    """Two table cells per variant: the median of per-round ratios, and the ratio of the fastest runs (on a
    machine whose speed wanders, the fastest run of each is the one least disturbed)."""
    medians = round_ratios(times, stock)
    return {name: f"{medians[name]:.3f} | {min(values) / min(times[stock]):.3f}" for name, values in times.items()}


class LinearClock:
    """Seconds spent inside the transformer's ``nn.Linear`` layers (CPU: their calls are synchronous).

    The linear layers are about 86% of a step here and are the same work in
    every variant (xattn only changes the attention core), yet their time
    wanders by 10% between steps of this machine. Giving every step the run's
    median linear time instead of its own (a control variate) leaves the
    ratios with the part the variants differ in; the raw ratios stay beside it.
    """

    def __init__(self, transformer):
        self.seconds, self._started = 0.0, []
        self._handles = []
        for module in transformer.modules():
            if isinstance(module, torch.nn.Linear):
                self._handles.append(module.register_forward_pre_hook(self._start))
                self._handles.append(module.register_forward_hook(self._stop))

    def _start(self, module, args):
        self._started.append(time.perf_counter())

    def _stop(self, module, args, out):
        self.seconds += time.perf_counter() - self._started.pop()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def shared_linear_ratios(times: dict[str, list[float]], linear: dict[str, list[float]], stock: str) -> dict[str, float]:
    """Median over rounds of (time - own linear time + the run's median linear time), as a ratio to stock's."""
    common = statistics.median(t for values in linear.values() for t in values)

    def adjusted(name: str, r: int) -> float:
        return times[name][r] - linear[name][r] + common

    return {name: statistics.median(adjusted(name, r) / adjusted(stock, r) for r in range(len(values)))
            for name, values in times.items()}


def measure(transformer, table: dict[str, Variant], kwargs: dict, repeats: int, device, PeakMemory) -> list[str]:
    cuda = device.type == "cuda"
    clock = None if cuda else LinearClock(transformer)
    name_of = {id(variant): name for name, variant in table.items()}
    linear: dict[str, list[float]] = {name: [] for name in table}

    def step(variant: Variant) -> float:
        with variant.enter(), torch.no_grad():
            if cuda:
                torch.cuda.synchronize()
            if clock is not None:
                clock.seconds = 0.0
            start = time.perf_counter()
            transformer(**kwargs)
            if variant.after is not None:
                variant.after()
            if cuda:
                torch.cuda.synchronize()
            spent = time.perf_counter() - start
            if clock is not None:
                linear[name_of[id(variant)]].append(clock.seconds)
            return spent

    for variant in table.values():  # warm-up round, not timed
        step(variant)
    for values in linear.values():
        values.clear()
    times = timed_rounds(table, step, repeats)
    if clock is not None:
        clock.close()
    peak_memory, peaks, held = PeakMemory(device), {}, {}
    for name, variant in table.items():  # one more round for peak memory and bytes held
        with variant.enter(), torch.no_grad():
            peaks[name] = peak_memory.measure(lambda: (transformer(**kwargs), variant.after and variant.after()))
            held[name] = variant.held()
    stock = next(iter(table))
    ratios, stock_peak = ratio_cells(times, stock), peaks[stock]
    shared = shared_linear_ratios(times, linear, stock) if clock is not None else {}
    lines = []
    for name, values in times.items():
        peak = "n/a | n/a" if peaks[name] is None else \
            f"{peaks[name] / 2**20:.1f} | {peaks[name] / stock_peak:.2f}" if stock_peak else f"{peaks[name] / 2**20:.1f} | -"
        share = f"{shared[name]:.3f} | {statistics.median(linear[name]):.3f}" if shared else "n/a | n/a"
        lines.append(f"| {name} | {statistics.median(values):.4f} | {ratios[name]} | {share} | {held[name]} | {peak} |")
    return lines
