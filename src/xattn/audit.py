"""Coverage audit: every denoiser class of the installed diffusers, and what xattn does with it.

Each ``*Transformer*Model`` and ``UNet*Model`` class is built with its default
config on the ``meta`` device (no weights, no memory), its sites listed with
:func:`xattn.sites` and its processors checked with
:func:`xattn.install.hookable`. Statuses:

- ``hooked, tested``: every site hookable, and a test runs the class (:data:`TESTED`);
- ``hooked, untested``: every site hookable, no test runs it;
- ``refused``: xattn refuses it by name: processor classes it does not
  reproduce (``UnsupportedProcessorError`` when hooked), a model or an
  attention module it cannot read (``UnsupportedModelError``,
  ``UnsupportedAttentionError``), or no attention sites at all;
- ``crashes``: listing its sites raises something that is not an
  :class:`~xattn.errors.XattnError` (a bug: refusals must be named errors);
- ``not instantiated``: the default config does not build (the error's first line).

Used by ``scripts/audit_denoisers.py`` (which writes ``docs/coverage.md``) and
``xattn sites --audit``.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Iterator

from .errors import XattnError

Row = tuple[str, str, str]  # (class name, status, detail)

# Classes a test runs end to end (hooks, parity with stock, float64 references), and where.
TESTED = {
    "UNet2DConditionModel": "test_pipelines.py, test_processor.py (SD 1.x / 2.x / SDXL)",
    "Transformer2DModel": "inside UNet2DConditionModel (test_session.py)",
    "PixArtTransformer2DModel": "test_dit.py",
    "SanaTransformer2DModel": "test_sana_model.py, test_sana_pipeline.py",
    "SD3Transformer2DModel": "test_joint.py, test_joint_maps.py, test_sd3_t5.py",
    "FluxTransformer2DModel": "test_joint.py, test_joint_maps.py, test_flux_pipeline.py",
    "ChromaTransformer2DModel": "test_audit.py (parity with stock, single-stream probs vs float64)",
    "Flux2Transformer2DModel": "test_flux2.py (parity with stock, both blocks' probs vs float64, fused reweight)",
}

STATUSES = ("hooked, tested", "hooked, untested", "refused", "crashes", "not instantiated")


def denoiser_classes() -> list[str]:
    """Names of diffusers' denoiser classes: ``*Transformer*Model`` and ``UNet*Model``."""
    import diffusers

    names = [name for name in dir(diffusers) if name.endswith("Model")]
    return sorted(name for name in names if "Transformer" in name or name.startswith("UNet"))


@contextmanager
def _quiet() -> Iterator[None]:
    """No warnings and no log records below ERROR while models are built; the previous state after."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def build(name: str):
    """The diffusers class ``name`` built with its default config on the ``meta`` device."""
    import diffusers
    import torch

    with torch.device("meta"), _quiet():
        return getattr(diffusers, name)()


def audit(name: str) -> tuple[str, str]:
    """(status, detail) of the diffusers class ``name``."""
    from .install import hookable
    from .sites import NOT_A_SITE, sites

    try:
        model = build(name)
    except Exception as error:  # noqa: BLE001: any failure to build is reported, not raised
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return "not instantiated", f"{type(error).__name__}: {first[:100]}"
    try:
        found, processors = sites(model), hookable(model)
    except XattnError as error:  # a named refusal: its whole (one-line) message
        return "refused", f"{type(error).__name__}: {_first_line(error)}"
    except Exception as error:  # noqa: BLE001: a bug, reported as such
        return "crashes", f"xattn.sites raises {type(error).__name__}: {_first_line(error)[:90]}"
    if not found or not processors:
        return "refused", "no attention sites xattn can see"
    skipped = sum(1 for reason in processors.values() if reason and reason.startswith(NOT_A_SITE))
    refused = sorted({cls for cls in processors.values() if cls is not None and not cls.startswith(NOT_A_SITE)})
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(Counter(site.kind for site in found).items()))
    if skipped:
        kinds += f"; {skipped} linear-attention modules are not sites (no map), left untouched"
    if refused:
        return "refused", f"processor {', '.join(refused)} (UnsupportedProcessorError); sites: {kinds}"
    if name in TESTED:
        return "hooked, tested", f"{TESTED[name]}; sites: {kinds}"
    return "hooked, untested", f"sites: {kinds}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def audit_all(names: Iterable[str] | None = None) -> list[Row]:
    """(class, status, detail) of every denoiser class (or of ``names``), in name order."""
    return [(name, *audit(name)) for name in (denoiser_classes() if names is None else names)]


def table(rows: list[Row]) -> str:
    """A markdown table of the rows."""
    lines = ["| class | status | detail |", "|---|---|---|"]
    lines += [f"| `{name}` | {status} | {detail.replace('|', '/')} |" for name, status, detail in rows]
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """``"72 classes: 4 hooked, tested, ..."``: the count of each status, in :data:`STATUSES` order."""
    totals = Counter(status for _, status, _ in rows)
    counts = ", ".join(f"{totals[status]} {status}" for status in STATUSES if totals[status])
    return f"{len(rows)} classes: {counts}"


def report(rows: list[Row]) -> str:
    """What ``xattn sites --audit`` and the script print: the table, then the summary."""
    return f"{table(rows)}\n\n{summary(rows)}"


def page(rows: list[Row], command: str) -> str:
    """``docs/coverage.md``: a title, what the statuses mean, the summary and the table."""
    import diffusers

    return (
        "# Denoiser coverage\n\n"
        f"Generated by `{command}` (or `xattn sites --audit`, which prints the same table) on diffusers "
        f"{diffusers.__version__}: every `*Transformer*Model` and `UNet*Model` class, built with its default "
        "config on the `meta` device, its attention sites listed with `xattn.sites` and its processors checked "
        "against what xattn hooks (`xattn.install.hookable`).\n\n"
        "- **hooked**: xattn installs on every site (stock `AttnProcessor2_0` / `AttnProcessor`, or a joint "
        "processor whose core it routes); *tested* names the tests that run the class, and it says nothing "
        "of a pipeline adapter.\n"
        "- **refused**: xattn refuses the class with a named error before changing anything: "
        "`UnsupportedProcessorError` for processor classes it does not reproduce (named in the detail, with "
        "the kinds of the sites it lists), `UnsupportedModelError` for a model with no `attn_processors` "
        "(diffusers keeps no registry of its attention processors, so xattn can neither list nor replace "
        "them), `UnsupportedAttentionError` for an attention module whose heads or head size xattn cannot "
        "read; or it has no attention sites at all.\n"
        "- **crashes**: listing its sites raises an error that is not an `XattnError` (a bug: a refusal must "
        "be a named error).\n"
        "- **not instantiated**: its default config does not build, so nothing was checked.\n\n"
        "Site kinds: `cross` (image queries, text keys), `self`, `joint` (image and text tokens in one "
        "attention: dual-stream blocks with their own text projections, and single-stream blocks that "
        "attend over text and image concatenated, as Flux's, Chroma's and Flux 2's do).\n\n"
        f"{summary(rows)}.\n\n{table(rows)}\n"
    )


__all__ = ["STATUSES", "TESTED", "Row", "audit", "audit_all", "build", "denoiser_classes", "page", "report",
           "summary", "table"]
