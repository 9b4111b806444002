"""The layer rule (docs/architecture.md): imports only point down, faces use only the
public API, and the standard-library-only parts import nothing third-party.

Every ``import`` in the package is checked, including those inside functions, so a
lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import secvf

PACKAGE = Path(secvf.__file__).parent

#: Rank of each top-level part of ``secvf``: a module may import its own package and
#: packages of a strictly lower rank. Equal ranks in different packages may not import
#: each other, so the subsystems form a DAG.
RANKS = {
    "errors": 0,
    "model": 1,
    "store": 2,
    "vsock": 3,
    "image": 3,
    "exec": 3,
    "net": 3,
    "guest": 4,
    "machine": 4,
    "analysis": 4,
    "jail": 5,
    "runtime": 6,
    "workflows": 7,
    "sdk": 8,
    "api": 9,
    "faces": 10,
    "__main__": 11,
    "testing": 12,
}

#: What a face (CLI, MCP server, TUI) may import from ``secvf``.
FACE_IMPORTS = {"api", "errors", "faces"}

#: Modules that run where only the standard library exists (the guest) or that must
#: stay free of third-party code (the vsock backend process).
STDLIB_ONLY = ("secvf.errors", "secvf.exec.protocol", "secvf.exec.forwarding",
               "secvf.store.eventlog", "secvf.store.locks", "secvf.model.settingsfile",
               "secvf.vsock", "secvf.guest",
               # the switch side of isolated networks (it parses frames guests send);
               # the decoder and the filter language beside it use dpkt
               *(f"secvf.net.{m}" for m in ("frame", "ratelimit", "events", "config",
                                            "engine", "taps", "switch", "watchdog",
                                            "launcher", "control", "capture", "pcapng",
                                            "capture_file")),
               # the jail launcher runs before anything but the standard library is
               # visible to the jailed process, and what it loads comes along
               *(f"secvf.jail.{m}" for m in ("launcher", "spec", "seccomp", "cgroup",
                                             "inspect")),
               "secvf.machine.seccomp", "secvf.machine.share_launcher")


def module_name(path: Path) -> str:
    """``src/secvf/store/library.py`` -> ``secvf.store.library``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def secvf_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``secvf.*`` module named by an import in ``path``, with its line."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else module_name(path)
    return imports_in(ast.parse(path.read_text(), filename=str(path)), package)


def imports_in(tree: ast.Module, package: str) -> list[tuple[int, str]]:
    """Every ``secvf.*`` module an import in ``tree`` names; ``package`` resolves
    relative imports."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("secvf")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target == "secvf" or target.startswith("secvf."):
                found += [(node.lineno, _submodule_or_package(target, a.name))
                          for a in node.names]
    return found


def _submodule_or_package(package: str, name: str) -> str:
    """``from secvf.exec import protocol`` names the module ``secvf.exec.protocol``;
    ``from secvf.exec import ExecClient`` names ``secvf.exec``."""
    candidate = f"{package}.{name}"
    where = PACKAGE.parent.joinpath(*candidate.split("."))
    return candidate if where.with_suffix(".py").exists() or where.is_dir() else package


def part_of(module: str) -> str:
    """The top-level part (``store``, ``faces`` …) a ``secvf.*`` module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_has_a_rank() -> None:
    parts = {part_of(module_name(p)) for p in all_modules()} - {"__init__"}
    assert parts <= set(RANKS), f"give these a rank: {sorted(parts - set(RANKS))}"


def test_imports_point_down() -> None:
    offenders = []
    for path in all_modules():
        source = part_of(module_name(path))
        if source == "__init__":
            continue
        for line, target in secvf_imports(path):
            dest = part_of(target)
            if dest == source or dest == "__init__":
                continue
            if RANKS[dest] >= RANKS[source]:
                offenders.append(f"{module_name(path)}:{line} imports {target} "
                                 f"({source} rank {RANKS[source]} -> {dest} rank {RANKS[dest]})")
    assert offenders == []


def test_faces_import_only_the_public_api_and_errors() -> None:
    offenders = []
    for path in all_modules():
        if part_of(module_name(path)) not in {"faces", "__main__"}:
            continue
        offenders += [f"{module_name(path)}:{line} imports {target}"
                      for line, target in secvf_imports(path)
                      if part_of(target) not in FACE_IMPORTS]
    assert offenders == []


def test_nothing_in_the_product_imports_the_test_seams() -> None:
    offenders = [f"{module_name(p)}:{line}" for p in all_modules()
                 if part_of(module_name(p)) != "testing"
                 for line, target in secvf_imports(p)
                 if part_of(target) == "testing"]
    assert offenders == []


def _is_stdlib_only(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in STDLIB_ONLY)


def test_stdlib_only_modules_import_only_stdlib_only_modules() -> None:
    """By source: no third-party import and no secvf module outside the stdlib-only set."""
    offenders = []
    for path in all_modules():
        name = module_name(path)
        if not _is_stdlib_only(name):
            continue
        offenders += [f"{name}:{line} imports {target}" for line, target in secvf_imports(path)
                      if not _is_stdlib_only(target)]
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     and not node.level else [])
            offenders += [f"{name}:{node.lineno} imports third-party {imported}"
                          for imported in names
                          if imported.split(".")[0] not in {*sys.stdlib_module_names, "secvf"}]
    assert offenders == []


#: The stdlib-only modules that start a process of their own (the supervisor runs them
#: with ``python -m``), and others that must stay light.
LIGHT_MODULES = ["secvf.vsock.__main__", "secvf.jail.launcher", "secvf.jail.seccomp",
                 "secvf.machine.share_launcher", "secvf.net.watchdog", "secvf.exec.protocol",
                 "secvf.exec.forwarding", "secvf.store.eventlog"]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_stdlib_only_modules_load_nothing_else(module: str) -> None:
    """At run time: importing the module (with the ``__init__`` of every package on its
    way) loads no third-party code and no secvf module outside the stdlib-only set -
    a package that imports its heavy modules eagerly makes every helper pay for them."""
    probe = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True,
                            text=True, check=True).stdout.split()
    third_party = sorted({m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names)
                         - {"secvf", "__main__"})
    assert [m for m in third_party if not m.startswith("_")] == []
    packages = {".".join(m.split(".")[:i]) for m in STDLIB_ONLY
                for i in range(1, m.count(".") + 1)}
    heavy = [m for m in loaded if m.startswith("secvf") and not _is_stdlib_only(m)
             and m not in packages]
    assert heavy == []


def test_the_checker_sees_lazy_relative_and_package_imports() -> None:
    """Imports inside functions, ``from secvf import x`` and relative forms all count."""
    tree = ast.parse("def f():\n    from secvf.runtime import control\n"
                     "    from secvf import errors\n    from ..faces import cli\n")
    assert [t for _, t in imports_in(tree, "secvf.store")] == [
        "secvf.runtime.control", "secvf.errors", "secvf.faces.cli"]


def _run_time_body(tree: ast.Module) -> ast.Module:
    """``tree``'s top-level statements, less its ``if TYPE_CHECKING:`` blocks."""
    body = [node for node in tree.body if not (
        isinstance(node, ast.If) and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING")]
    return ast.Module(body=body, type_ignores=[])


def test_no_package_imports_modules_that_import_through_it() -> None:
    """A package whose ``__init__`` imports one of its own modules that imports through
    the package (``from secvf.exec import protocol``) deadlocks when two threads make the
    first imports at once, one of the package and one of that module (the TUI's workers
    did): such a package re-exports lazily (``secvf.lazy_exports``)."""
    offenders = []
    for init in sorted(PACKAGE.rglob("__init__.py")):
        package = module_name(init)
        tree = _run_time_body(ast.parse(init.read_text()))
        own = {name for _, name in imports_in(tree, package)
               if name.startswith(f"{package}.") and name.count(".") == package.count(".") + 1}
        for module in sorted(own):
            path = init.parent / f"{module.rsplit('.', 1)[1]}.py"
            if path.exists() and any(isinstance(node, ast.ImportFrom) and node.module == package
                                     for node in ast.parse(path.read_text()).body):
                offenders.append(f"{package} imports {module}, which imports through it")
    assert offenders == []
