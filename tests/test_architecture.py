"""The house rules of docs/ARCHITECTURE.md, checked on the code itself (with ``ast``, nothing is run).

* A root script is an entry point: ``get_args_parser()`` and ``main(args)`` only, about 120 lines at
  most, calling into the library; no script imports another script.
* Private torch/torchvision APIs appear in one file only, the fast path's kernel module.
* Each package's ``__init__.py`` says in its docstring what lives there.
"""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in ROOT.glob("*.py"))
SCRIPT_NAMES = {p.stem for p in SCRIPTS}
ENTRY_POINT_FUNCTIONS = {"get_args_parser", "main"}
MAX_SCRIPT_LINES = 130
EXEMPT = {"demo.py"}  # the demo's step table is its content; it still imports no script
PRIVATE_APIS = r"torch\._nnpack\|mkldnn\._convolution\|_setup_scales\|_filter_input"


def _imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_script_imports_another(script):
    imported = _imported_modules(ast.parse(script.read_text())) & SCRIPT_NAMES
    assert not imported - {script.stem}, f"{script.name} imports the scripts {sorted(imported)}"


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.name not in EXEMPT], ids=lambda p: p.name)
def test_a_script_is_a_parser_and_a_main(script):
    text = script.read_text()
    tree = ast.parse(text)
    functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert functions == ENTRY_POINT_FUNCTIONS and not classes, f"{script.name} defines {sorted(functions)} {classes}"
    assert len(text.splitlines()) <= MAX_SCRIPT_LINES, f"{script.name} has {len(text.splitlines())} lines"
    assert ast.get_docstring(tree), f"{script.name} has no module docstring with its canonical command"


def test_private_apis_live_in_one_file():
    found = subprocess.run(["git", "grep", "-l", PRIVATE_APIS, "--", "*.py", ":!tests"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    assert len(found) <= 1, f"private torch/torchvision APIs are used in {found}"


@pytest.mark.parametrize("package", sorted(p.parent for p in ROOT.glob("[a-z]*/**/__init__.py")
                                           if ".venv" not in p.parts and "tests" not in p.parts),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_package_says_what_lives_there(package):
    assert ast.get_docstring(ast.parse((package / "__init__.py").read_text())), f"{package} has no docstring"
