"""Imports run in one direction: core <- wire <- {server, client} <- sim <- cli.

Every import statement counts, the lazy ones inside functions too, so a layer cannot reach a
higher one by importing late.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fedcl"

# layer -> module prefixes it must never import
FORBIDDEN = {
    "core": ("flwr", "grpc", "fedcl.wire", "fedcl.server", "fedcl.client", "fedcl.sim", "fedcl.cli"),
    "wire": ("fedcl.server", "fedcl.client", "fedcl.sim", "fedcl.cli"),
    "server": ("fedcl.client", "fedcl.sim", "fedcl.cli"),
    "client": ("fedcl.server", "fedcl.sim", "fedcl.cli"),
    "sim": ("fedcl.cli",),
}


def layer_of(path: Path, root: Path) -> str | None:
    rel = path.relative_to(root).parts
    if rel[0] in ("wire", "server", "client", "sim"):
        return rel[0]
    if rel == ("cli.py",):
        return None  # the top: it may import every layer
    return "core"


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(("fedcl", *path.relative_to(root).parts[:-1]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def violations(root: Path = PKG) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        layer = layer_of(path, root)
        if layer is None:
            continue
        for line, module in imported_modules(path, root):
            for banned in FORBIDDEN[layer]:
                if module == banned or module.startswith(banned + "."):
                    out.append(f"{path.relative_to(root.parent)}:{line} ({layer}) imports {module}")
    return out


def test_imports_run_in_one_direction():
    assert not violations(), "imports against the layer order:\n" + "\n".join(violations())


def test_the_check_sees_a_violation(tmp_path):
    """The scan is not vacuous: a core module importing grpc, and a server module importing the client,
    fail."""
    fake = tmp_path / "fedcl"
    (fake / "server").mkdir(parents=True)
    (fake / "queue.py").write_text("def f():\n    import grpc\n")
    (fake / "server" / "app.py").write_text("from ..client import app\n")
    (fake / "cli.py").write_text("import fedcl.sim\n")  # the top may
    found = violations(fake)
    assert found == ["fedcl/queue.py:2 (core) imports grpc",
                     "fedcl/server/app.py:1 (server) imports fedcl.client"]


@pytest.mark.parametrize("name", ["server", "client"])
def test_no_top_level_server_or_client_package_is_shipped(name):
    import tomllib

    config = tomllib.loads((PKG.parent / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["fedcl*"]
    assert not (PKG.parent / name).exists()
