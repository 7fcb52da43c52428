"""Edit images by editing attention (prompt-to-prompt, Hertz et al. 2022).

Modules, in the order a run uses them:

- :mod:`~xattn.edit.windows`: step windows (``"0:0.8"``, per word), resolved once per run;
- :mod:`~xattn.edit.align`: token alignment of source and target prompts as mapper matrices;
- :mod:`~xattn.edit.pairs`: which batch rows are edited from which source row;
- :mod:`~xattn.edit.controllers`: :class:`Replace`, :class:`Refine`, :class:`SelfInject`;
- :mod:`~xattn.edit.blend`: :class:`LocalBlend`, source latents outside the words' maps;
- :mod:`~xattn.edit.run`: :func:`edit` / :func:`edit_seeds`, one batch from shared latents, plus the plain re-prompt.
"""

from .align import Mapper, align_tokens, refine_mapper, replace_mapper, stretch
from .blend import LocalBlend
from .controllers import AutoEdit, Refine, Replace, SelfInject
from .errors import EditError
from .pairs import edit_layout
from .run import EditResult, build_controllers, edit, edit_seeds, initial_latent

__all__ = [
    "AutoEdit", "EditError", "EditResult", "LocalBlend", "Mapper", "Refine", "Replace", "SelfInject",
    "align_tokens", "build_controllers", "edit", "edit_layout", "edit_seeds", "initial_latent", "refine_mapper",
    "replace_mapper", "stretch",
]
