"""xattn: see and steer how a prompt's words shape a diffusion image.

The public API, in the order a newcomer meets it:

- :func:`sites` lists the attention modules of a model, named by module path;
- :class:`Selector` chooses sites, resolutions, steps, heads and tokens;
- :func:`hooks` opens a scoped session that installs xattn's processor;
- :class:`Hook` / :class:`Controller` run code at the hook points;
- :class:`TokenMap` aligns the words of a prompt with token slots.
"""

from .hookpoints import POINTS, BatchLayout, Controller, Hook, HookContext, Row
from .selector import Selector, SelectorError
from .session import Session, hooks
from .sites import Site, resolution_of, sites
from .tokens import TokenError, TokenMap
from .reweight import Reweight  # noqa: F401  (issue 5: attention-level word weights)
from .capture import Capture, WordMaps  # noqa: F401  (issue 4: capture, word maps, report, export)
from .edit import EditError, LocalBlend, Refine, Replace, SelfInject  # noqa: F401  (issue 6: prompt-to-prompt; xattn.edit.edit runs one)

__version__ = "0.1.0"

__all__ = [
    "POINTS",
    "BatchLayout",
    "Controller",
    "Hook",
    "HookContext",
    "Row",
    "Selector",
    "SelectorError",
    "Session",
    "Site",
    "TokenError",
    "TokenMap",
    "hooks",
    "resolution_of",
    "sites",
]
