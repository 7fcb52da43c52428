"""The library stands apart from the app: no library module imports the CLI, run folders, configs or sweeps.

Imports are read with ``ast`` (relative ones resolved against the module's
package), so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SOURCE / "xattn"
APP = ("xattn.app", "xattn.cli", "xattn.__main__")
# Old import paths kept for scripts and docs; they are the app's modules under another name.
SHIMS = ("xattn.runner", "xattn.pngmeta")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, text: str | None = None) -> set[str]:
    """Every module ``path`` (or ``text`` read as if it were there) imports; ``from x import y`` counts x and x.y."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(text if text is not None else path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    return found


def is_app(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in APP + SHIMS)


LIBRARY = sorted(path for path in PACKAGE.rglob("*.py") if not is_app(module_name(path)))


def test_the_split_is_seen():
    names = {module_name(path) for path in LIBRARY}
    assert {"xattn.session", "xattn.tokens", "xattn.capture.report", "xattn.validate", "xattn.files"} <= names
    assert not names & {"xattn.app.runner", "xattn.cli.common", "xattn.runner"}
    # The checker itself sees an app import when there is one.
    assert is_app("xattn.app.runfolder") and is_app("xattn.runner") and not is_app("xattn.files")


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: module_name(p))
def test_library_module_imports_nothing_from_the_app(path):
    offending = sorted(module for module in imported(path) if is_app(module))
    assert offending == [], f"{module_name(path)} imports app modules {offending}"


def test_relative_imports_are_resolved():
    """``from ..app import runner`` inside xattn.capture.report would be found."""
    text = "from ..app import runner\nfrom .. import files\n"
    assert {"xattn.app", "xattn.app.runner", "xattn.files"} <= imported(PACKAGE / "capture" / "report.py", text)
