"""The code map holds: which module may import what (read from the source, nothing runs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cao2_fast": ROOT / "cao2_fast", "cao2_fast.engines": ROOT / "engines",
            "cao2_fast.kernels": ROOT / "kernels"}


def modules():
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([pkg, *parts]), f, f.name == "__init__.py"


def imports(name: str, path: Path, is_pkg: bool) -> set[str]:
    """Every module ``name`` imports (absolute names; relative imports resolved)."""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            head = base[:len(base) - node.level + 1] if node.level else []
            mod = ".".join([*head, node.module] if node.module else head)
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("model", ["cao2_fast.models.dit", "cao2_fast.models.mar"])
def test_only_the_generators_the_loaders_and_the_presets_import_a_family_model(model):
    allowed = ("cao2_fast.models", "cao2_fast.generators", "cao2_fast.presets")
    users = [name for name, path, pkg in modules() if model in imports(name, path, pkg)
             and not name.startswith(allowed)]
    assert users == []


def test_lower_layers_never_import_the_method_the_output_or_the_cli():
    lower = ("cao2_fast.models", "cao2_fast.engines", "cao2_fast.kernels", "cao2_fast.diffusion")
    upper = ("cao2_fast.pipeline", "cao2_fast.output", "cao2_fast.cli", "cao2_fast.data", "cao2_fast.generators")
    bad = {name: sorted(i for i in imports(name, path, pkg) if i.startswith(upper))
           for name, path, pkg in modules() if name.startswith(lower)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_method_and_the_output_know_no_generator_family():
    """Outside the generators (and the DiT benchmarks, which time that family), nothing names a family."""
    family_free = ("cao2_fast.pipeline", "cao2_fast.output", "cao2_fast.data", "cao2_fast.engines",
                   "cao2_fast.generator", "cao2_fast.config", "cao2_fast.stage1", "cao2_fast.stage2")
    for name, path, pkg in modules():
        if any(name == p or name.startswith(p + ".") for p in family_free):
            found = imports(name, path, pkg)
            assert not any(i.startswith("cao2_fast.generators.") for i in found), name
            text = path.read_text()
            assert "DiTGenerator" not in text and "MARGenerator" not in text, name


def test_every_package_folder_is_installed():
    """A sub-package missing from pyproject's list would be missing from a regular install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as CI runs
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, _, pkg in modules() if pkg}
    assert found <= listed, sorted(found - listed)
