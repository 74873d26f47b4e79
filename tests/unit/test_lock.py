"""The lock files match pyproject.toml, pin every package with hashes, and are what ./dev.sh installed."""

import importlib.metadata
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")


def _compile_module():
    spec = importlib.util.spec_from_file_location("requirements_compile", ROOT / "requirements" / "compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPILE = _compile_module()


def pins(name: str) -> dict[str, str]:
    """canonical package name -> pinned version; each pin must carry at least one hash."""
    entries = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "requirements" / name).read_text(encoding="utf-8"))
    found = {}
    for entry in entries:
        match = PIN.match(entry)
        if match is None:
            continue
        assert "--hash=sha256:" in entry, f"{name}: {match['name']} has no hash"
        found[canonicalize_name(match["name"])] = match["version"]
    return found


@pytest.mark.parametrize("name", sorted(COMPILE.LOCKS))
def test_the_lock_was_made_from_the_current_dependencies(name):
    header = (ROOT / "requirements" / name).read_text(encoding="utf-8").splitlines()[:3]
    recorded = next(line.removeprefix(COMPILE.DIGEST_LINE) for line in header if line.startswith(COMPILE.DIGEST_LINE))
    assert recorded == COMPILE.dependencies_digest(), (
        f"requirements/{name} is older than pyproject.toml's dependencies: run `python requirements/compile.py`")


@pytest.mark.parametrize("name", sorted(COMPILE.LOCKS))
def test_every_declared_dependency_is_pinned_within_its_range(name):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [Requirement(text) for text in project["dependencies"]]
    for extra in COMPILE.LOCKS[name]:
        declared += [Requirement(text) for text in project["optional-dependencies"][extra]]
    locked = pins(name)
    for requirement in declared:
        package = canonicalize_name(requirement.name)
        if package in COMPILE.UNLOCKED:
            assert package not in locked
            continue
        assert package in locked, f"{name}: {requirement} is not pinned"
        assert requirement.specifier.contains(locked[package], prereleases=True), (
            f"{name}: {package}=={locked[package]} is outside {requirement}")


def test_this_environment_holds_the_dev_lock():
    """./dev.sh installs requirements/dev.txt: the environment the tests run in is the locked one."""
    differing = {}
    for package, version in pins("dev.txt").items():
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            differing[package] = (version, installed)
    assert differing == {}
