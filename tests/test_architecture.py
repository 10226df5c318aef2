"""docs/architecture.md matches the tree, and imports follow its layers."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "keycap"
DOC = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()

#: What each private layer may import from keycap (besides itself).
ALLOWED = {
    "_rules": {"_errors", "_rules"},
    "_db": {"_errors", "_models", "_rules", "_db"},
    "_ops": {"_errors", "_models", "_rules", "_db", "_ops"},
}


def _modules() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" and "versions" not in p.parts
    )


def _named_in_doc(path: Path) -> bool:
    """The module is named in the doc: by its path below keycap/, or by its file
    name in the table of its folder (e.g. `keys.py` under **Statements** (`_db/`))."""
    rel = path.relative_to(PACKAGE).as_posix()
    return f"`{rel}`" in DOC or re.search(rf"`{re.escape(path.name)}`", DOC) is not None


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_every_module_is_named_in_the_architecture_doc(path: Path) -> None:
    assert _named_in_doc(path)


def test_every_module_the_doc_names_exists() -> None:
    dotted = set(re.findall(r"`(_(?:rules|ops|db)\.[a-z_]+)\.", DOC))
    assert dotted
    for name in dotted:
        assert (PACKAGE / (name.replace(".", "/") + ".py")).is_file(), name


def _keycap_imports(path: Path) -> set[str]:
    """The first component below ``keycap`` of every keycap module ``path`` imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keycap"):
            parts = node.module.split(".")
            if len(parts) > 1:
                out.add(parts[1])
            else:  # from keycap import _rules, ...
                out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "keycap" and len(parts) > 1:
                    out.add(parts[1])
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_what_is_below_it(layer: str) -> None:
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        assert _keycap_imports(path) <= ALLOWED[layer], path.relative_to(PACKAGE)
