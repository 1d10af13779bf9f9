"""The packages depend on each other in one direction, which the folder names show:

    runtimes          the bundle format, the sampler and its backends (torch-free), at the bottom
    reference         the PyTorch model, beside it (it reads images with the runtime's helpers)
    quantize          weight quantization: uses the two above
    meissonic_export  the exporter and its CLI, on top

Every import is checked, including those inside functions, so a lazy import cannot hide a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
MAY_IMPORT = {
    "runtimes": {"runtimes"},
    "reference": {"reference", "runtimes"},
    "quantize": {"quantize", "reference", "runtimes"},
    "meissonic_export": {"meissonic_export", "quantize", "reference", "runtimes"},
}
TORCH_FREE = {"runtimes"}  # the offline runtime installs without torch


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y: inside the file's own package
                parts = path.relative_to(root).with_suffix("").parts[: -node.level]
                modules = [node.module] if node.module else [alias.name for alias in node.names]
                found += [(node.lineno, ".".join([*parts, module])) for module in modules]
            else:  # installed under the `meissonic` namespace (pyproject.toml): meissonic.runtimes is runtimes
                found.append((node.lineno, node.module.removeprefix("meissonic.")))
    return found


def _violations(package: str, root: Path = ROOT) -> list[str]:
    allowed = MAY_IMPORT[package] | (set() if package in TORCH_FREE else {"torch"})
    ours = set(MAY_IMPORT) | {"torch"}
    return [
        f"{path.relative_to(root)}:{line} imports {module}"
        for path in sorted((root / package).rglob("*.py"))
        for line, module in _imports(path, root)
        if module.split(".")[0] in ours and module.split(".")[0] not in allowed
    ]


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_go_one_way(package):
    assert _violations(package) == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """A function-level import of the exporter from the runtime is caught, as is a relative one."""
    fake = tmp_path / "runtimes"
    fake.mkdir()
    (fake / "x.py").write_text("def f():\n    from meissonic_export import cli\n    import torch\n")
    (fake / "y.py").write_text("from .. import quantize\nfrom meissonic.reference import pipeline\n")
    assert _violations("runtimes", tmp_path) == [
        "runtimes/x.py:2 imports meissonic_export", "runtimes/x.py:3 imports torch", "runtimes/y.py:1 imports quantize",
        "runtimes/y.py:2 imports reference",  # the installed name of a layer counts as the layer
    ]  # fmt: skip


def test_allowed_directions_have_no_cycle():
    """The table itself is a partial order: no package may import one that may import it back."""
    for package, allowed in MAY_IMPORT.items():
        for other in allowed - {package}:
            assert package not in MAY_IMPORT[other], (package, other)
