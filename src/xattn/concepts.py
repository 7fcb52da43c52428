"""Concept maps on joint-attention transformers (ConceptAttention, Helbling et al., ICML 2025).

A *concept* is any word, in the prompt or not ("red", "circle", "background").
Its embedding travels through every joint block as one more text token, with
the text stream's own weights (adaLN, projections, QK norms, MLP), but in
attention it only *reads*: concept queries attend to image, text and concept
keys, and no image or text query sees a concept key.  So the image is exactly
what it would have been, and each block yields, for every image token and
concept, the dot product of their attention *outputs* (the space the block
writes back into the streams), which ConceptAttention found sharper than the
raw image->text attention.  ``cross`` maps (image queries against concept keys)
are kept too, for comparison.

How: a forward pre-hook appends the concept rows to the transformer's text
input; the joint processor's attention core (the one call xattn routes, see
:mod:`xattn.joint`) splits them off, runs the usual core on the rest (fused, or
with a session's hooks) and computes the concept rows explicitly.

    with xattn.concepts(pipe, ["red", "circle", "background"]) as found:
        pipe("a red circle")
    found.maps()  # [rows, concepts, h, w]: softmax over concepts, mean over blocks and calls

Supported: SD3-family transformers (``SD3Transformer2DModel``: text after the
image in the joint sequence, dual-stream blocks). Other denoisers are refused
by name.  Dimensions: b rows, h heads, s joint sequence, i image tokens, k concepts.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import UnsupportedProcessorError, XattnError

_LIVE = threading.local()


class ConceptError(XattnError, ValueError):
    """Concept maps asked of a model or with concepts they cannot be computed for."""


def live_stream() -> "ConceptStream | None":
    """The concept stream of the current thread's transformer call, or None."""
    return getattr(_LIVE, "stream", None)


@dataclass
class ConceptStream:
    """Per transformer call: how many concept rows ride at the end of the text, and where maps go."""

    rows: int  # concept rows appended after the text
    image_tokens: int  # image tokens of this call (the patch grid)
    found: "ConceptMaps"
    block: int = 0  # joint blocks seen so far in this call

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               main: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Attention over [image, text, concepts] ([b, h, s, d]); ``main`` computes the image and text rows.

        The image and text rows see only image and text keys, so ``main`` gets
        exactly the tensors it would get without concepts. Concept rows attend to every key.
        """
        total = q.shape[2]
        if total != self.image_tokens + self.found.text_rows + self.rows:  # a self-attention call (SD3.5's attn2)
            return main(q, k, v)
        cut = total - self.rows
        out = main(*(x[:, :, :cut].contiguous() for x in (q, k, v)))  # [b, h, s - k, d]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        q_concepts = q[:, :, cut:]  # [b, h, k, d]
        concept_out = (q_concepts @ k.transpose(-1, -2) * scale).float().softmax(-1).to(v.dtype) @ v  # [b, h, k, d]
        image = slice(0, self.image_tokens)
        self.found.record(self.block, out[:, :, image], concept_out, q[:, :, image], k[:, :, cut:], scale)
        self.block += 1
        return torch.cat([out, concept_out], dim=2)


@dataclass
class ConceptMaps:
    """What one ``with xattn.concepts(...)`` block collected: running sums, so memory does not grow with steps."""

    concepts: tuple[str, ...]
    blocks: tuple[int, ...] | None  # joint blocks to keep (their order in a call), None = all
    text_rows: int = 0  # the prompt's text rows (set per call)
    grid: tuple[int, int] = (0, 0)  # the patch grid (h, w)
    calls: int = 0  # transformer calls seen
    _output: torch.Tensor | None = field(default=None, repr=False)  # [b, i, k] summed softmax maps
    _cross: torch.Tensor | None = field(default=None, repr=False)  # [b, i, k]
    _count: int = 0

    def record(self, block: int, image_out, concept_out, image_q, concept_k, scale: float) -> None:
        if self.blocks is not None and block not in self.blocks:
            return
        with torch.no_grad():
            b, h, i, d = image_out.shape
            flat_image = image_out.transpose(1, 2).reshape(b, i, h * d).float()  # heads side by side
            flat_concepts = concept_out.transpose(1, 2).reshape(b, -1, h * d).float()  # [b, k, h*d]
            output = (flat_image @ flat_concepts.transpose(1, 2)).softmax(-1)  # [b, i, k]
            cross = (image_q.float() @ concept_k.float().transpose(-1, -2) * scale).softmax(-1).mean(1)  # [b, i, k]
            if self._output is None or self._output.shape != output.shape:
                self._output, self._cross, self._count = output.cpu(), cross.cpu(), 1
            else:
                self._output += output.cpu()
                self._cross += cross.cpu()
                self._count += 1

    def maps(self, kind: str = "output") -> torch.Tensor:
        """[rows, concepts, h, w]: per image token, a softmax over the concepts, averaged over blocks and calls.

        ``kind="output"``: ConceptAttention's output-space maps; ``"cross"``: image queries against concept keys.
        Rows are the transformer's batch rows (with classifier-free guidance: the unconditional rows first).
        """
        if kind not in ("output", "cross"):
            raise ConceptError(f"kind must be 'output' or 'cross', not {kind!r}")
        total = self._output if kind == "output" else self._cross
        if total is None:
            raise ConceptError("no concept maps were recorded: run the pipeline (or the transformer) inside "
                               "the `with xattn.concepts(...)` block, with at least one selected block")
        b, i, k = total.shape
        return (total / self._count).transpose(1, 2).reshape(b, k, *self.grid)

    def word(self, concept: str, row: int = -1, kind: str = "output", size: tuple[int, int] | None = None):
        """One concept's map of one batch row, [h, w], bilinearly upsampled to ``size`` when given."""
        if concept not in self.concepts:
            raise ConceptError(f"{concept!r} is not one of the concepts {list(self.concepts)}")
        m = self.maps(kind)[row, self.concepts.index(concept)]
        if size is not None:
            m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        return m


def _sd3_family(transformer):
    from diffusers import SD3Transformer2DModel

    from .joint import family_of

    if not isinstance(transformer, SD3Transformer2DModel):
        raise ConceptError(f"concept maps need an SD3-family joint transformer (text after the image in one "
                           f"attention); {type(transformer).__name__} is not one")
    families = set()
    for name, processor in transformer.attn_processors.items():
        stock = getattr(processor, "stock", processor)  # inside an xattn session: the wrapped stock processor
        family = family_of(stock)
        if family is None:
            raise UnsupportedProcessorError(f"concept maps: {name} runs {type(stock).__name__}, not a joint processor "
                                            "xattn routes; restore the stock processors")
        families.add(family)
    return families


def concept_embeddings(pipe, concepts: Sequence[str]) -> torch.Tensor:
    """[k, d]: each concept's text rows as the pipeline encodes it alone, its word tokens averaged.

    The rows are those of the first (CLIP) tokenizer: start and end tokens are left out.
    """
    embeds, *_ = pipe.encode_prompt(list(concepts), None, None, do_classifier_free_guidance=False)  # [k, s, d]
    rows = []
    for n, concept in enumerate(concepts):
        ids = pipe.tokenizer(concept).input_ids  # [start, word tokens..., end]
        words = len(ids) - 2
        if words < 1 or len(ids) > pipe.tokenizer.model_max_length:
            raise ConceptError(f"concept {concept!r} has {max(words, 0)} word tokens; give a word or a short phrase")
        rows.append(embeds[n, 1:1 + words].mean(0))
    return torch.stack(rows)


class concepts:  # noqa: N801 (used like a function: `with xattn.concepts(pipe, [...]) as found`)
    """Collect concept maps during the pipeline calls inside the block (see the module docstring).

    Args:
        pipe: an SD3-family pipeline (its ``transformer`` and ``encode_prompt`` are used).
        words: the concepts, each a word or short phrase; need not be in the prompt.
        blocks: indices of the joint blocks to average over (their order in the model), None for all.
    """

    def __init__(self, pipe, words: Sequence[str], *, blocks: Sequence[int] | None = None):
        words = tuple(words)
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise ConceptError(f"concepts must be a non-empty list of words, got {list(words)!r}")
        if len(set(words)) != len(words):
            raise ConceptError(f"each concept once, please: {list(words)!r}")
        self.pipe = pipe
        self.transformer = getattr(pipe, "transformer", None)
        if self.transformer is None:
            raise ConceptError(f"concept maps need a joint-attention transformer; {type(pipe).__name__} has none")
        self.families = _sd3_family(self.transformer)
        layers = len(self.transformer.transformer_blocks)
        if blocks is not None:
            bad = [b for b in blocks if not isinstance(b, int) or not 0 <= b < layers]
            if bad or not blocks:
                raise ConceptError(f"blocks must be indices in 0..{layers - 1}, got {list(blocks)!r}")
        self.found = ConceptMaps(words, None if blocks is None else tuple(blocks))
        self._stack: ExitStack | None = None

    def __enter__(self) -> ConceptMaps:
        with torch.no_grad():
            self._rows = concept_embeddings(self.pipe, self.found.concepts)  # [k, d]
        self._stack = ExitStack()
        self._stack.callback(self.transformer.register_forward_pre_hook(self._before, with_kwargs=True).remove)
        self._stack.callback(self.transformer.register_forward_hook(self._after, with_kwargs=True).remove)
        return self.found

    def __exit__(self, *exc) -> None:
        _LIVE.stream = None
        routes = getattr(self, "_routes", None)
        if routes is not None:  # a transformer call that raised never reached _after
            routes.close()
        self._stack.close()

    def _before(self, module, args, kwargs):
        from .joint import routed

        args = list(args)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if "encoder_hidden_states" in kwargs:
            text = kwargs["encoder_hidden_states"]
        elif len(args) > 1:
            text = args[1]
        else:
            raise ConceptError("concept maps need the transformer called with encoder_hidden_states")
        rows = self._rows.to(text.device, text.dtype)[None].expand(text.shape[0], -1, -1)
        longer = torch.cat([text, rows], dim=1)
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = longer
        else:
            args[1] = longer
        patch = module.config.patch_size
        self.found.grid = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
        self.found.text_rows = text.shape[1]
        self.found.calls += 1
        stream = ConceptStream(len(self.found.concepts), self.found.grid[0] * self.found.grid[1], self.found)
        _LIVE.stream = stream
        self._routes = ExitStack()
        for family in self.families:  # stock processors (no session, or no hooks at a site) come here
            self._routes.enter_context(routed(family, self._core))
        return tuple(args), kwargs

    def _after(self, module, args, kwargs, output):
        self._routes.close()
        self._routes = None
        _LIVE.stream = None
        return output

    @staticmethod
    def _core(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **rest):
        if attn_mask is not None or dropout_p or is_causal or rest:
            raise UnsupportedProcessorError("concept maps: the joint core was called with a mask, dropout or "
                                            "other options xattn does not model")
        stream = live_stream()

        def main(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

        return main(query, key, value) if stream is None else stream.attend(query, key, value, scale, main)


__all__ = ["ConceptError", "ConceptMaps", "ConceptStream", "concept_embeddings", "concepts", "live_stream"]
