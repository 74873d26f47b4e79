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


def extras() -> set[str]:
    return {requirement for name, requirements in PROJECT["optional-dependencies"].items() if name != "test"
            for requirement in declared(requirements)}


def test_the_service_declares_what_it_imports():
    missing = third_party_distributions(REPOSITORY / "icldaemon") - declared(PROJECT["dependencies"]) - extras()
    assert not missing, f"imported by icldaemon/ but neither a dependency nor in an extra: {sorted(missing)}"


def test_each_extra_is_what_icldaemon_extras_names():
    from icldaemon.extras import EXTRAS

    for module, (extra, _, _) in EXTRAS.items():
        assert canonicalize_name(module) in declared(PROJECT["optional-dependencies"][extra]), (module, extra)
        assert canonicalize_name(module) not in declared(PROJECT["dependencies"]), module


def test_the_service_runs_without_its_extras():
    """With pgserver, gguf and matplotlib hidden, the service's modules import and the command line answers;
    a use that needs one names the extra to install."""
    import subprocess

    script = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'pgserver', 'gguf', 'matplotlib'}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import importlib.util\n"
        "importlib.util.find_spec = lambda name, package=None: None if name.split('.')[0] in "
        "{'pgserver', 'gguf', 'matplotlib'} else _find(name, package)\n"
        "import icldaemon.service, icldaemon.worker, icldaemon.cli, icldaemon.store.database, icldaemon.engine.loading\n"
        "from icldaemon.extras import require\n"
        "try:\n"
        "    require('pgserver')\n"
        "except Exception as exc:\n"
        "    print(exc)\n"
    )
    script = "import importlib.util\n_find = importlib.util.find_spec\n" + script
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pip install 'icldaemon[embedded]', or set ICLD_DATABASE_URL" in result.stdout


def test_the_test_extra_declares_what_the_tests_import():
    everything = declared(PROJECT["dependencies"]) | declared(PROJECT["optional-dependencies"]["test"]) | extras()
    missing = third_party_distributions(REPOSITORY / "tests") - everything
    assert not missing, f"imported by tests/ but not declared: {sorted(missing)}"
