#!/usr/bin/env python
"""Coverage audit: every denoiser class in the installed diffusers, and what xattn does with it.

The audit itself is :mod:`xattn.audit` (``xattn sites --audit`` prints the same
table): each ``*Transformer*Model`` and ``UNet*Model`` class is built with its
default config on the ``meta`` device and its attention sites and processors
are checked against what xattn hooks. Statuses: hooked, tested; hooked,
untested; refused (a named ``XattnError``: the processor, the model or an
attention module xattn does not understand); crashes (a bug: listing its sites
raises something that is not an ``XattnError``); not instantiated.

    python scripts/audit_denoisers.py                      # the table on stdout
    python scripts/audit_denoisers.py --write docs/coverage.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xattn.audit import TESTED, audit, audit_all, denoiser_classes, page, report, table  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the table into this markdown file (a whole page)")
    args = parser.parse_args()
    rows = audit_all()
    if args.write is None:
        print(report(rows))
        return
    args.write.write_text(page(rows, f"python scripts/audit_denoisers.py --write {args.write}"))


if __name__ == "__main__":
    main()
