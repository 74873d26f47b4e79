"""Every third-party package the code and the tests import is declared in pyproject.toml."""

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPOSITORY = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def imported_top_level_names(directory: Path) -> set[str]:
    names = set()
    for path in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def third_party_distributions(directory: Path) -> set[str]:
    local = {path.stem for path in directory.rglob("*.py")} | {"icldaemon"}
    providers = packages_distributions()
    found = set()
    for name in imported_top_level_names(directory) - set(sys.stdlib_module_names) - local:
        assert name in providers, f"{name}, imported under {directory.name}/, is installed by no distribution"
        found.update(canonicalize_name(distribution) for distribution in providers[name])
    return found


def declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(requirement).name) for requirement in requirements}


def test_the_service_declares_what_it_imports():
    missing = third_party_distributions(REPOSITORY / "icldaemon") - declared(PROJECT["dependencies"])
    assert not missing, f"imported by icldaemon/ but not in [project] dependencies: {sorted(missing)}"


def test_the_test_extra_declares_what_the_tests_import():
    everything = declared(PROJECT["dependencies"]) | declared(PROJECT["optional-dependencies"]["test"])
    missing = third_party_distributions(REPOSITORY / "tests") - everything
    assert not missing, f"imported by tests/ but not declared: {sorted(missing)}"
