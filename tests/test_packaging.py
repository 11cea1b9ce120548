"""The installed house: one ``fedsynth`` package over the top-level folders, imports one way.

``pyproject.toml`` maps ``fedsynth.server`` to ``server/``, ``fedsynth.client`` to ``client/``, and
so on. These tests read that mapping and the folders independently of each other: every module
imports under its ``fedsynth.`` name from this checkout, the wheel holds ``fedsynth/`` and nothing
beside it, and no module reaches up a layer (``common`` <- ``client``/``server`` <- ``simulations``
<- ``cli``).
"""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
FOLDERS = {"cli", "client", "common", "server", "simulations"}
# What each layer may import from fedsynth, besides itself.
MAY_IMPORT = {
    "common": set(),
    "client": {"common"},
    "server": {"common"},
    "simulations": {"common", "client", "server"},
    "cli": {"common", "client", "server", "simulations"},
}


def _sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["fedsynth", *parts])


def test_every_folder_is_a_listed_package_and_every_listed_package_a_folder() -> None:
    setuptools = PROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == {f"fedsynth.{name}": name for name in FOLDERS}
    folders = {
        _module_name(path.parent / "__init__.py")
        for path in [*_sources(), *ROOT.glob("common/presets/*.toml")]
    }
    assert set(setuptools["packages"]) == folders
    assert PROJECT["project"]["scripts"] == {"fedsynth": "fedsynth.cli:main"}
    components = PROJECT["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedsynth.server.app:app",
        "clientapp": "fedsynth.client.app:app",
    }


def test_every_module_imports_as_fedsynth_from_this_checkout() -> None:
    names = [_module_name(path) for path in _sources() if path.name != "__main__.py"]
    assert len(names) > 60  # the walk found the tree
    for name in names:
        module = importlib.import_module(name)
        assert module.__file__ is not None
        assert Path(module.__file__).resolve().is_relative_to(ROOT), name


def test_the_flower_components_are_the_apps() -> None:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    for reference, kind in (
        ("fedsynth.server.app:app", ServerApp),
        ("fedsynth.client.app:app", ClientApp),
    ):
        module, attribute = reference.split(":")
        assert isinstance(getattr(importlib.import_module(module), attribute), kind)


def _fedsynth_imports(path: Path) -> set[str]:
    """The top-level folders a module imports from (``fedsynth.<folder>...``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            assert top not in FOLDERS, f"{path}: imports {name!r}, not fedsynth.{name}"
            if top == "fedsynth":
                found.add(name.split(".")[1])
    return found


def test_imports_run_one_way() -> None:
    for path in _sources():
        layer = path.relative_to(ROOT).parts[0]
        reached = _fedsynth_imports(path) - {layer}
        assert reached <= MAY_IMPORT[layer], f"{path} imports {sorted(reached)}"


@pytest.mark.slow
def test_the_wheel_holds_only_the_fedsynth_package(tmp_path: Path) -> None:
    # What the Docker image copies, in a folder of its own: setuptools' build/ stays out of the
    # checkout, and nothing left there by an earlier build can end up in this wheel.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("fedsynth-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(metadata).decode()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"fedsynth", wheel.name.split("-py3")[0] + ".dist-info"}
    packaged = {n.removeprefix("fedsynth/") for n in names if n.endswith(".py")}
    expected = {str(p.relative_to(ROOT)) for p in _sources()}
    assert packaged == expected
    assert "fedsynth/common/presets/cpu-small.toml" in names
    assert not any(n.startswith("fedsynth/__init__") for n in names)  # a namespace package
    assert "fedsynth = fedsynth.cli:main" in entry_points
