"""The one base class of every error a user can cause and fix.

The CLI prints any :class:`XattnError` as a single ``Error:`` line with exit
code 2; every other exception is a bug and keeps its traceback. Each concrete
error also derives from the built-in it refines (``ValueError``,
``KeyError``...), so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations


class XattnError(Exception):
    """Something the user asked for that xattn cannot do, said in one line."""


class UnsupportedProcessorError(XattnError, TypeError):
    """A site holds an attention processor that xattn does not reproduce exactly."""


class UnsupportedModelError(XattnError, TypeError):
    """A model that keeps no registry of its attention processors (no ``attn_processors``): xattn cannot list
    or replace them."""


class UnsupportedAttentionError(XattnError, TypeError):
    """An attention module whose layout xattn cannot read (its heads or head size)."""


class NothingSelectedError(XattnError, ValueError):
    """A request that would do nothing: a selector that matches no site, an unhonoured option."""


class LayoutError(XattnError, ValueError):
    """The rows of a denoiser call cannot be matched to the prompts of the pipeline call."""


__all__ = ["XattnError", "UnsupportedProcessorError", "UnsupportedModelError", "UnsupportedAttentionError",
           "NothingSelectedError", "LayoutError"]
