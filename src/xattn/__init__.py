"""xattn: see and steer how a prompt's words shape a diffusion image.

The public API, in the order a newcomer meets it:

- :func:`sites` lists the attention modules of a model, named by module path;
- :class:`Selector` chooses where and when (sites, kind, resolution, steps);
- :func:`hooks` opens a scoped session that installs xattn's processor;
- :class:`Hook` / :class:`Controller` run code at the hook points, with the
  run lifecycle ``begin_run`` / hooks / ``on_step_end``;
- :class:`TokenMap` aligns the words of a prompt with token slots;
- the controllers: :class:`Capture` (word maps), :class:`Reweight` (word
  weights), :class:`Replace`, :class:`Refine`, :class:`LocalBlend`,
  :class:`SelfInject` (prompt-to-prompt; :func:`xattn.edit.edit` runs one),
  :class:`Guide` (guidance with the losses of :mod:`xattn.guide`);
- :mod:`xattn.world`, the shapes world and its shipped model.

Every error a user can cause derives from :class:`XattnError`.
"""

from .errors import LayoutError, NothingSelectedError, UnsupportedProcessorError, XattnError
from .hookpoints import POINTS, BatchLayout, Controller, Hook, HookContext, HookError, Row, Run
from .selector import Selector, SelectorError
from .steps import StepWindowError
from .session import Session, hooks
from .sites import Site, resolution_of, sites
from .tokens import TokenError, TokenMap
from .reweight import Ramp, Reweight
from .capture import Capture, WordMaps
from .edit import EditError, LocalBlend, Refine, Replace, SelfInject
from .guide import Guide
from .inversion import Inversion, InversionError, invert
from .concepts import ConceptError, ConceptMaps, concepts
from . import world

__version__ = "0.1.0"

__all__ = [
    "concepts",
    "POINTS",
    "BatchLayout",
    "Capture",
    "ConceptError",
    "ConceptMaps",
    "Controller",
    "EditError",
    "Guide",
    "Hook",
    "HookContext",
    "HookError",
    "Inversion",
    "InversionError",
    "LayoutError",
    "LocalBlend",
    "NothingSelectedError",
    "Ramp",
    "Refine",
    "Replace",
    "Reweight",
    "Row",
    "Run",
    "Selector",
    "SelectorError",
    "SelfInject",
    "Session",
    "Site",
    "StepWindowError",
    "TokenError",
    "TokenMap",
    "UnsupportedProcessorError",
    "WordMaps",
    "XattnError",
    "hooks",
    "invert",
    "resolution_of",
    "sites",
    "world",
]
