"""Old import path of :mod:`xattn.app.runner`, kept because scripts and docs use ``from xattn import runner``."""

import sys

from .app import runner as _runner

sys.modules[__name__] = _runner  # one module under both names, so patching either patches both
