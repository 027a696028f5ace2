"""The packages keep their rooms: imports point one way, and protocol/ stays light.

    commons/                       the CLI, on top: may import everything below
    node/  coordinator/  index/    the three roles: never import each other
    modeling/                      base models and LoRA, shared by node/ and coordinator/
    protocol/                      the bottom: imports none of the above, and no torch at import
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"protocol", "modeling", "node", "coordinator", "index", "commons"}
ALLOWED = {
    "protocol": {"protocol"},
    "modeling": {"protocol", "modeling"},
    "node": {"protocol", "modeling", "node"},
    "coordinator": {"protocol", "modeling", "coordinator"},
    "index": {"protocol", "index"},
    "commons": OURS,
}


def imported_packages(path: Path) -> set[str]:
    """Our top-level packages a file imports, wherever in the file (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_below_it(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    wrong = {name: packages for name, packages in wrong.items() if packages}
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package])}: {wrong}"


def test_importing_all_of_protocol_and_modeling_imports_no_torch() -> None:
    script = (
        "import importlib, pkgutil, sys\n"
        "for top in ('protocol', 'modeling'):\n"
        "    package = importlib.import_module(top)\n"
        "    for info in pkgutil.walk_packages(package.__path__, top + '.'):\n"
        "        if not info.name.endswith('__main__'):\n"
        "            importlib.import_module(info.name)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("package", ["protocol", "protocol.content", "protocol.signing", "protocol.data",
                                     "protocol.p2p", "modeling", "node", "coordinator", "index", "commons"])
def test_every_package_opens_with_a_map_of_its_parts(package: str) -> None:
    init = ROOT / package.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    modules = [p.stem for p in init.parent.glob("*.py") if p.stem not in {"__init__", "__main__"}]
    unnamed = [m for m in modules if m not in doc]
    assert not unnamed, f"{init.relative_to(ROOT)}'s docstring does not name {unnamed}"
