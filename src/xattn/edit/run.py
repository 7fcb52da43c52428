"""The library entry of prompt-to-prompt editing: one batch, one latent, outputs on disk.

:func:`edit` samples the source prompt and every target prompt in *one*
pipeline call from the *same* initial latent (Hertz et al. 2022), with the
edit controllers installed, then samples each target plainly from that latent
(the "re-prompt", for contrast). Everything that can be checked before
sampling is checked first: words are resolved to token slots and mappers are
built at this boundary, so a typo fails in milliseconds, not after a run.

    result = edit(pipe, "a red circle and a blue square", ["a green circle and a blue square"],
                  blend=["circle"], seed=3)
    result.save("outputs/my-edit")     # source.png, target.png, reprompt.png, sheet.png, edit.json
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..adapters import Encoded, adapter_for, at_asked_size
from ..grid import labelled_grid
from ..files import OverwriteError, save_image_atomic, write_json_atomic
from ..session import hooks
from ..tokens import TokenMap
from .align import choose_mode, chunk_count
from .blend import BLEND_DILATE, BLEND_STEPS, BLEND_THRESHOLD, LocalBlend, composite_targets, pixel_margin
from .controllers import SELF_RES, SELF_RES_AUTO, AutoEdit, Refine, Replace, SelfInject
from .errors import EditError
from .windows import CROSS_STEPS, SELF_STEPS, WindowSpec

MODES = {"auto": AutoEdit, "replace": Replace, "refine": Refine}
MANIFEST = "edit.json"


@dataclass
class EditResult:
    """Images of one edit and what made them.

    Attributes:
        source: the source prompt's image (row 0 of the edit batch).
        targets: one edited image per target prompt.
        reprompts: each target prompt sampled plainly from the same latent (empty if not asked).
        settings: prompts, seed, steps, windows... as recorded in manifests.
    """

    source: Any
    targets: list
    reprompts: list
    settings: dict = field(default_factory=dict)

    def file_names(self) -> dict[str, list[str]]:
        """``source.png``, ``target.png`` / ``target-1.png``..., ``reprompt.png`` / ``reprompt-1.png``..."""
        def numbered(stem: str, count: int) -> list[str]:
            return [f"{stem}.png"] if count == 1 else [f"{stem}-{k}.png" for k in range(1, count + 1)]
        return {"source": ["source.png"], "targets": numbered("target", len(self.targets)),
                "reprompts": numbered("reprompt", len(self.reprompts)) if self.reprompts else []}

    def sheet(self, cell_scale: int = 2):
        """A side-by-side sheet: source and edited targets on top, plain re-prompts below."""
        prompts = [self.settings.get("source", "source"), *self.settings.get("targets", [])]
        rows = [[self.source, *self.targets]]
        labels = ["prompt-to-prompt"]
        if self.reprompts:
            rows.append([None, *self.reprompts])
            labels.append("plain re-prompt")
        return labelled_grid(rows, row_labels=labels, col_labels=prompts, cell_scale=cell_scale,
                             title=f"seed {self.settings.get('seed')}")

    def save(self, folder: str | Path) -> list[Path]:
        """Write the images, ``sheet.png`` and ``edit.json`` into ``folder``; never overwrites a file."""
        folder = Path(folder)
        names = self.file_names()
        images = [(name, image) for key, items in (("source", [self.source]), ("targets", self.targets),
                                                   ("reprompts", self.reprompts))
                  for name, image in zip(names[key], items)]
        planned = [name for name, _ in images] + ["sheet.png", MANIFEST]
        clashes = [name for name in planned if (folder / name).exists()]
        if clashes:
            raise OverwriteError(f"{folder} already holds {', '.join(clashes)}; an edit never overwrites files")
        folder.mkdir(parents=True, exist_ok=True)
        written = [save_image_atomic(image, folder / name) for name, image in images]
        written.append(save_image_atomic(self.sheet(), folder / "sheet.png"))
        written.append(write_json_atomic(folder / MANIFEST, {"settings": self.settings, "files": names}))
        return written


def build_controllers(tokenizer, source: str, targets: Sequence[str], *, mode: str = "auto",
                      cross_steps: WindowSpec | Mapping[str, WindowSpec] = CROSS_STEPS, self_steps: WindowSpec = SELF_STEPS,
                      self_res: str | None = SELF_RES, blend: str | Sequence[str] | None = None,
                      threshold: float = BLEND_THRESHOLD, blend_res: str | None = None,
                      blend_dilate: int = BLEND_DILATE, blend_steps: WindowSpec = BLEND_STEPS,
                      reweight: Mapping[str, float] | None = None, rows: str = "cond",
                      self_kind: str = "self", token_maps: Sequence[TokenMap] | None = None) -> list:
    """The controllers of an edit, in the order they must run, checked against the prompts.

    Order: LocalBlend (reads the targets' own maps), Reweight per target (the
    equalizer), the cross-attention edit (which applies those weights to the
    replaced maps), self-attention injection.

    Args:
        tokenizer: the pipeline's (first) tokenizer, or the :class:`~xattn.prompts.LongPromptTokenizer`
            that names the slots of long prompts (:func:`prompt_tokenizer` says which).
        source: the source prompt.
        targets: one or more target prompts.
        mode: ``"replace"`` (word swap), ``"refine"`` (added words) or ``"auto"``.
        cross_steps: window of cross-attention replacement, or a dict per word.
        self_steps: window of self-attention injection (``None``: none).
        self_res: map sizes where self-attention is injected.
        blend: words for :class:`LocalBlend` (``None``: no blending).
        threshold: LocalBlend's threshold.
        blend_res: map sizes LocalBlend reads (``None``: all cross sites).
        blend_dilate: latent pixels by which LocalBlend widens its mask (0: as thresholded).
        blend_steps: window of steps after which LocalBlend blends (default: every step).
        reweight: word -> weight for the target prompts (prompt-to-prompt's equalizer, ``scale`` mode).
        rows: ``"cond"`` or ``"all"`` (see :mod:`xattn.edit.pairs`).
        self_kind: ``"self"``, or ``"joint"`` on a transformer without separate self-attention,
            where the source's whole joint map (image and text queries) is injected.
        token_maps: the prompts' token maps as the pipeline lays their text out (source first); default
            ``TokenMap(tokenizer, prompt)`` (Sana's text sits behind an instruction: see :func:`_token_maps`).

    Raises:
        EditError: no targets, unknown mode, prompts a word swap cannot align, a target
            filling more 75-token chunks than the source,
            words (blend, reweight, per-word windows) that are not in the prompts.
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise EditError("an edit needs at least one target prompt")
    if mode not in MODES:
        raise EditError(f"edit mode must be one of {', '.join(MODES)}, not {mode!r}")
    if token_maps is None:
        token_maps = [TokenMap(tokenizer, prompt) for prompt in (source, *targets)]
    elif len(token_maps) != 1 + len(targets):
        raise EditError(f"build_controllers got {len(token_maps)} token maps for {1 + len(targets)} prompts")
    token_maps = list(token_maps)
    cross = MODES[mode](cross_steps, rows=rows)
    cross.mappers(token_maps)  # raises for prompts the mode cannot align
    cross.slot_windows(token_maps)  # raises for per-word windows naming absent words
    controllers: list = []
    if blend:
        local_blend = LocalBlend(blend, threshold, res=blend_res, dilate=blend_dilate, steps=blend_steps)
        local_blend.word_slots(token_maps)  # raises for absent words
        controllers.append(local_blend)
    if reweight:
        from ..reweight import Reweight  # the reweighting controller, used as prompt-to-prompt's equalizer

        for prompt_index, target_map in enumerate(token_maps[1:], start=1):
            for word in reweight:
                target_map.indices(word)  # raises TokenError naming the word and the prompt's words
            controllers.append(Reweight(dict(reweight), mode="scale", prompt_index=prompt_index))
    controllers.append(cross)
    if self_steps is not None:
        controllers.append(SelfInject(self_steps, self_res, rows=rows, selector=f"kind={self_kind}"))
    return controllers


def initial_latent(pipe, seed: int, width: int, height: int) -> torch.Tensor:
    """The latent ``pipe`` would draw for one image with ``seed``: ``[1, C, height / f, width / f]``, or on
    Flux ``[1, n, 4 C]``, packed as ``FluxPipeline`` packs it (one token per 2x2 latent patch).

    Drawn the way diffusers draws it for a per-image CPU generator, so the
    source of an edit is the image ``xattn generate --seed`` makes.
    """
    from diffusers.utils.torch_utils import randn_tensor

    factor = pipe.vae_scale_factor
    model = _denoiser(pipe)
    packed = _packs_latents(pipe)
    grid = 2 * factor if packed else factor  # Flux: a 2x2 patch of latent pixels per token
    if width % grid or height % grid:
        what = f"twice the VAE's factor ({factor}): Flux packs 2x2 latent pixels per token" if packed \
            else f"the VAE's factor {factor}"
        raise EditError(f"size {width}x{height} must be a multiple of {what}")
    channels = model.config.in_channels // 4 if packed else model.config.in_channels
    shape = (1, channels, height // factor, width // factor)
    latent = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(int(seed)),
                          device=pipe.device, dtype=model.dtype)
    if packed:  # FluxPipeline.prepare_latents draws [1, C, H, W] and packs it
        latent = pipe._pack_latents(latent, 1, channels, height // factor, width // factor)
    return latent


def _model(pipe):
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def _packs_latents(pipe) -> bool:
    """Whether ``pipe`` denoises packed latents ``[B, n, 4 C]`` (Flux)."""
    return type(_model(pipe)).__name__.startswith("Flux")


def _denoiser(pipe):
    """The UNet, or a transformer: SD3/PixArt-style (latents drawn unpacked, [1, C, h, w]), or Flux's
    text-to-image ``FluxPipeline`` (latents packed, see :func:`initial_latent`)."""
    model = _model(pipe)
    if model is None:
        raise EditError(f"editing runs on pipelines with a UNet or a transformer; {type(pipe).__name__} has neither")
    if _packs_latents(pipe) and not any(cls.__name__ == "FluxPipeline" for cls in type(pipe).__mro__):
        raise EditError(f"editing runs on Flux's text-to-image FluxPipeline only; {type(pipe).__name__} adds "
                        "image inputs or tokens of its own")
    return model


def _self_kind(pipe) -> str | None:
    """Where self-attention injection goes: self sites, or the joint sites of a model that has no others;
    None on a model with neither (Sana: its self-attention is linear, with no attention maps to inject)."""
    from ..sites import sites

    kinds = {site.kind for site in sites(_denoiser(pipe))}
    if "self" in kinds:
        return "self"
    return "joint" if "joint" in kinds else None


def default_self_res(pipe) -> str | None:
    """What ``self_res="auto"`` means on ``pipe``: prompt-to-prompt's ``"<=32"`` on a UNet, whose maps come
    in several sizes; every site (None) on a transformer, whose sites all see the one patch grid."""
    return SELF_RES if getattr(pipe, "unet", None) is not None else None


def injects_self_attention(pipe) -> bool:
    """Whether an edit on ``pipe`` can inject the source's self-attention maps (false on Sana, whose self-attention
    is linear: no maps)."""
    return _self_kind(pipe) is not None


def _image_size(pipe, size) -> tuple[int, int]:
    from ..validate import parse_size

    dims = parse_size(size)
    if dims is not None:
        return dims
    if _packs_latents(pipe):  # as FluxPipeline sizes an image when none is given
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return side, side
    side = _denoiser(pipe).config.sample_size * pipe.vae_scale_factor
    return side, side


def _reads_long_prompts(pipe) -> bool:
    """Whether the pipeline's prompts go through the long-prompt encoder (SD 1.x/2.x, SDXL: a UNet and CLIP)."""
    return getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder", None) is not None \
        and "CLIP" in type(getattr(pipe, "tokenizer", None)).__name__


def prompt_tokenizer(pipe, prompts: Sequence[str], negative_prompt: str | None = None, syntax: str = "a1111"):
    """The tokenizer that names the slots of an edit batch of ``prompts``: the pipeline's for plain prompts,
    a :class:`~xattn.prompts.LongPromptTokenizer` for prompts the long-prompt encoder encodes.

    Raises:
        EditError: prompts with prompt editing, alternation or ``AND`` (a schedule or a
            composition runs its own rows), or long prompts on a pipeline without the encoder.
    """
    if not _reads_long_prompts(pipe):
        return pipe.tokenizer
    from ..prompts import LongPromptTokenizer, UnsupportedSyntaxError
    from ..prompts.pipeline import hook_names

    negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
    try:
        tokenizer = hook_names(pipe, list(prompts), negatives, syntax=syntax).get("tokenizer", pipe.tokenizer)
    except UnsupportedSyntaxError as error:
        raise EditError(f"an edit's prompts cannot hold AND (composable diffusion): {error}") from None
    if tokenizer is not pipe.tokenizer and not isinstance(tokenizer, LongPromptTokenizer):
        raise EditError("an edit's prompts cannot hold prompt editing or alternation ([a:b:0.5], [a|b]); "
                        "edit from the text of one step instead")
    return tokenizer


def _prompt_kwargs(pipe, prompts: list[str], negative_prompt: str | None, syntax: str) -> dict:
    """``prompt=`` strings, or the long-prompt encoder's embeddings (every prompt padded with empty chunks
    to the longest, the negative prompts too), as ``xattn generate`` hands them to the pipeline."""
    negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
    if not _reads_long_prompts(pipe):
        return {"prompt": prompts, **({"negative_prompt": negatives} if negatives is not None else {})}
    from ..prompts.pipeline import SCHEDULE_KEY, prompt_kwargs

    kwargs = prompt_kwargs(pipe, prompts, negatives, syntax=syntax)
    if SCHEDULE_KEY in kwargs:  # prompt_tokenizer refused these first
        raise EditError("an edit's prompts cannot hold prompt editing, alternation or AND")
    return kwargs


def _sample(pipe, prompts: list[str], latents: torch.Tensor, seeds: list[int], *, steps: int, guidance: float,
            width: int, height: int, negative_prompt: str | None, output_type: str, syntax: str = "a1111",
            **kwargs) -> list:
    """Sample every prompt from every latent in one call; images come back prompt-major (``p * K + k``)."""
    count = len(seeds)
    # Image k of every prompt starts from latent k and draws the sampler's noise from seed k.
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for _ in prompts for seed in seeds]
    kwargs.update(_prompt_kwargs(pipe, prompts, negative_prompt, syntax))
    at_asked_size(pipe, kwargs)  # PixArt/Sana: the latents' own size, as ``xattn generate`` runs it
    repeated = latents.repeat(len(prompts), *[1] * (latents.dim() - 1))  # [P K, C, h, w], or Flux's [P K, n, c]
    result = pipe(num_images_per_prompt=count, latents=repeated,
                  generator=generators, num_inference_steps=int(steps), guidance_scale=float(guidance),
                  width=width, height=height, output_type=output_type, **kwargs)
    return list(result.images)  # PIL images, or [C, h, w] latents ([n, c] packed on Flux) for "latent"


def edit_seeds(pipe, source: str, targets: str | Sequence[str], seeds: Sequence[int], *, mode: str = "auto",
               cross_steps: WindowSpec | Mapping[str, WindowSpec] = CROSS_STEPS, self_steps: WindowSpec = SELF_STEPS,
               self_res: str | None = SELF_RES_AUTO, blend: str | Sequence[str] | None = None, threshold: float = 0.3,
               blend_res: str | None = None, blend_dilate: int = BLEND_DILATE, blend_steps: WindowSpec = BLEND_STEPS,
               reweight: Mapping[str, float] | None = None, rows: str = "cond", steps: int | None = None,
               guidance: float = 5.0, size=None, negative_prompt: str | None = None, reprompt: bool = True,
               output_type: str = "pil", inversion=None, syntax: str = "a1111",
               blend_pixels: int | None = None) -> list[EditResult]:
    """Edit the source prompt's image into each target prompt's (prompt-to-prompt), for several seeds at once.

    All seeds, the source and every target go through one pipeline call
    (``num_images_per_prompt = len(seeds)``); image ``k`` of every prompt
    starts from seed ``k``'s latent, and is edited from the source's image ``k``.

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, a transformer pipeline
            (SD3, PixArt), or Flux's text-to-image ``FluxPipeline`` (no negative prompt: see ``guidance``).
        source: the source prompt.
        targets: one target prompt or several (all edited in the same batch).
        seeds: one seed per image: the initial latent and the sampler's noise.
        mode, cross_steps, self_steps, self_res, blend, threshold, blend_res,
            blend_dilate, blend_steps, reweight, rows: see :func:`build_controllers`; ``self_res``
            defaults to ``"auto"`` (:func:`default_self_res`: ``"<=32"`` on a UNet, every site on a transformer).
        steps: number of denoising steps (``None``: 25, or the inversion's).
        guidance: classifier-free guidance scale; on Flux, the distilled guidance the pipeline takes as
            ``guidance_scale`` (no unconditional rows).
        size: ``64`` or ``"WIDTHxHEIGHT"``; ``None`` for the model's size.
        negative_prompt: one negative prompt for every row (refused on Flux, where it would turn on true CFG).
        reprompt: also sample each target plainly from the same latents.
        output_type: ``"pil"``, or ``"latent"`` for the final latents ``[C, h, w]`` (Flux: packed ``[n, c]``,
            as ``FluxPipeline`` returns them; for analysis; :meth:`EditResult.save` and ``sheet`` need PIL images).
        inversion: an :class:`xattn.invert.Inversion` of a real image: the
            source row starts from its noise and follows it (one seed only;
            steps and size are the inversion's).
        syntax: the dialect the prompts are written in (``"a1111"`` or ``"compel"``).
        blend_pixels: with ``blend``, also take each edited image's pixels farther than
            this many pixels outside the last blend mask from the source image
            (:func:`~xattn.edit.blend.composite`), so the VAE decoder cannot tint what
            the blend kept; ``None``: off. PIL output only.

    Prompts are handed to the pipeline as ``xattn generate`` hands them
    (:func:`xattn.prompts.pipeline.prompt_kwargs`): plain prompts as text, and on
    SD 1.x/2.x and SDXL prompts over 75 tokens, with ``BREAK`` or with weights as the
    long-prompt encoder's embeddings (A1111's 75-token chunks and emphasis),
    every prompt of the batch padded with empty chunks to the longest. Their
    words are looked up over all chunks (a word of chunk 2 at slots 77 and up),
    so a word swapped in chunk 2 takes the source's chunk-2 maps. A target may
    not fill more chunks than the source (:func:`xattn.edit.align.check_chunks`).

    Returns:
        One :class:`EditResult` per seed, in the order of ``seeds``.
    """
    if output_type not in ("pil", "latent"):
        raise EditError(f"output_type must be 'pil' or 'latent', not {output_type!r}")
    if pixel_margin(blend_pixels) is not None and output_type != "pil":
        raise EditError("blend_pixels composites decoded images: it needs output_type 'pil', not 'latent'")
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise EditError("an edit needs at least one seed")
    check_pipeline(pipe, negative_prompt, inversion)  # refuses pipelines whose latents an edit cannot share
    targets = [targets] if isinstance(targets, str) else list(targets)
    tokenizer = prompt_tokenizer(pipe, [source, *targets], negative_prompt, syntax)
    if inversion is not None and tokenizer is not pipe.tokenizer:
        raise EditError("an inverted image is edited with plain prompts of one 77-token window (no weights, "
                        "BREAK or long prompts): the inversion encodes the source as plain text")
    words = _word_tokenizer(pipe, tokenizer)
    self_kind = _self_kind(pipe)
    if self_res == SELF_RES_AUTO:
        self_res = default_self_res(pipe)
    if self_kind is None and self_steps is not None:
        raise EditError(f"{type(_denoiser(pipe)).__name__} has no softmax self-attention (Sana's is linear: no "
                        "attention maps), so there is nothing to inject: pass self_steps=None (--self-steps none)")
    token_maps = _token_maps(pipe, words, [source, *targets])
    controllers = build_controllers(words, source, targets, mode=mode, cross_steps=cross_steps,
                                    self_kind=self_kind or "self",
                                    token_maps=token_maps,
                                    self_steps=self_steps, self_res=self_res, blend=blend, threshold=threshold,
                                    blend_res=blend_res, blend_dilate=blend_dilate, blend_steps=blend_steps,
                                    reweight=reweight, rows=rows)
    followers: list = []
    if inversion is None:
        steps = 25 if steps is None else steps
        width, height = _image_size(pipe, size)
        latents = torch.cat([initial_latent(pipe, seed, width, height) for seed in seeds])  # [K, C, h, w]
    else:
        steps, width, height, latents, negative_prompt = _from_inversion(inversion, pipe, seeds, steps, size,
                                                                         negative_prompt)
        followers = inversion.controllers()  # before LocalBlend, which blends with the followed source
    common = dict(steps=steps, guidance=guidance, width=width, height=height, negative_prompt=negative_prompt,
                  output_type=output_type, syntax=syntax)
    names = {} if tokenizer is pipe.tokenizer else {"prompts": [source, *targets], "tokenizer": tokenizer}
    with hooks(pipe, *followers, *controllers, **names):
        images = _sample(pipe, [source, *targets], latents, seeds, **common)
    images, composited = composite_targets(images, len(seeds), controllers, blend_pixels)
    reprompts = _sample(pipe, targets, latents, seeds, **common) if reprompt else []
    settings = {
        "source": source, "targets": targets, "steps": int(steps), "guidance": float(guidance),
        "size": f"{width}x{height}", "negative_prompt": negative_prompt,
        "modes": [choose_mode(token_maps[0], t) if mode == "auto" else mode for t in token_maps[1:]],
        **({"syntax": syntax} if syntax != "a1111" else {}),
        **({"chunks": [chunk_count(t) for t in token_maps]} if token_maps[0].chunks is not None else {}),
        "controllers": [c.to_dict() for c in controllers],
        **({"blend_pixels": blend_pixels} if composited else {}),
    }
    if inversion is not None:
        settings["inversion"] = inversion.to_dict()
    count = len(seeds)
    return [
        EditResult(images[k], images[count + k::count], reprompts[k::count], {**settings, "seed": seed})
        for k, seed in enumerate(seeds)
    ]


def check_pipeline(pipe, negative_prompt: str | None, inversion) -> None:
    """Refuse what an edit cannot honour on ``pipe``, before sampling (or inverting): on Flux (guidance-distilled,
    packed latents) a negative prompt and an inverted image; pipelines whose latents an edit cannot share."""
    _denoiser(pipe)
    if not _packs_latents(pipe):
        return
    if negative_prompt is not None:
        raise EditError(f"{type(pipe).__name__} is guidance-distilled: a negative prompt turns on true CFG, which "
                        "runs the transformer on the prompts' and the negative prompts' rows in two calls a step, "
                        "and an edit needs the source and target rows of one call; give no negative prompt "
                        "(guidance is the distilled guidance scale)")
    if inversion is not None:
        raise EditError(f"{type(pipe).__name__}: an inverted image (inversion=, --image) is edited on UNet "
                        "pipelines only")


def _word_tokenizer(pipe, tokenizer):
    """The tokenizer whose slots the edit's words take: Flux's text is T5's sequence alone (``tokenizer_2``;
    CLIP gives only the pooled vector), every other pipeline's the prompt tokenizer's."""
    if _packs_latents(pipe) and getattr(pipe, "tokenizer_2", None) is not None:
        return pipe.tokenizer_2
    return tokenizer


def _token_maps(pipe, words, prompts: list[str]) -> list[TokenMap]:
    """The prompts' token maps as the pipeline will lay their text out: ``TokenMap(words, prompt)``, or on Sana
    the map of the prompt behind the instruction ``SanaPipeline`` puts before it, at the sequence length it
    encodes to (the defaults of its call, which :func:`_sample` keeps): the slots the edit's rows hold at run
    time, so word swaps are aligned there (a plain Gemma map starts the prompt a slot early and is as long as
    the prompt, so two prompts of different piece counts would not even share a length)."""
    adapter = adapter_for(pipe)
    if adapter is None or adapter.family != "sana" or words is not getattr(pipe, "tokenizer", None):
        return [TokenMap(words, prompt) for prompt in prompts]
    defaults = inspect.signature(type(pipe).__call__).parameters
    length = int(defaults["max_sequence_length"].default)
    options = {key: defaults[key].default for key in ("complex_human_instruction", "clean_caption") if key in defaults}
    encoded = Encoded(list(prompts), [None] * len(prompts), 1, None, None, options=options)
    return [adapter.token_map(pipe, prompt, length, encoded) for prompt in prompts]


def _from_inversion(inversion, pipe, seeds, steps, size, negative_prompt):
    """Steps, size, start latent ``[1, C, h, w]`` and negative prompt of an edit of an inverted image."""
    if inversion.pipe is not pipe:
        raise EditError("the inversion was made with another pipeline; invert with the one that edits")
    if len(seeds) != 1:
        raise EditError(f"an inverted image is edited from its own noise: give one seed, not {len(seeds)}")
    if steps is not None and int(steps) != inversion.steps:
        raise EditError(f"the image was inverted with {inversion.steps} steps; edit with {inversion.steps}, "
                        f"not {steps} (or leave steps unset)")
    if size is not None and _image_size(pipe, size) != (inversion.width, inversion.height):
        raise EditError(f"the image was inverted at {inversion.width}x{inversion.height}; leave size unset")
    if negative_prompt is not None and inversion.method in ("negative-prompt", "null-text"):
        raise EditError(f"{inversion.method} inversion sets the unconditional rows itself; give no negative prompt")
    negative = inversion.negative_prompt() if negative_prompt is None else negative_prompt
    latents = inversion.noise.to(pipe.device, pipe.unet.dtype)
    return inversion.steps, inversion.width, inversion.height, latents, negative


def edit(pipe, source: str, targets: str | Sequence[str], *, seed: int = 0, **options) -> EditResult:
    """Edit the source prompt's image into each target prompt's (prompt-to-prompt), for one seed.

    The source and every target are sampled in one batch from the same
    initial latent, with the edit controllers installed; then each target is
    sampled plainly from that latent (the re-prompt, for contrast).

    Args:
        pipe: a pipeline :func:`edit_seeds` takes (SD 1.x/2.x, SDXL, SD3, PixArt, Flux's ``FluxPipeline``).
        source: the source prompt.
        targets: one target prompt or several.
        seed: seed of the shared initial latent and of the sampler's noise.
        **options: those of :func:`edit_seeds` (mode, cross_steps, self_steps,
            blend, reweight, steps, guidance, size, reprompt, output_type...).
    """
    return edit_seeds(pipe, source, targets, [seed], **options)[0]


__all__ = ["EditResult", "MODES", "build_controllers", "edit", "edit_seeds", "initial_latent", "prompt_tokenizer"]
