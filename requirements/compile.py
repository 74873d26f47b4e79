"""Regenerate the lock files from pyproject.toml: every package pinned, with the hashes of its files on PyPI.

    pip install uv && python requirements/compile.py

`service.txt`: the service's install (its dependencies and the bundled model's converter);
`dev.txt`: what ./dev.sh installs (the service, the demo's extras and the tests'). torch is left out of
both: it is installed first, pinned, as a CPU or a CUDA build (./dev.sh, the README's service install),
and the lock must not choose the build. Each file's header records a digest of pyproject.toml's
dependency lists; tests/unit/test_lock.py fails when they no longer match (run this again).
"""

import hashlib
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parent / "pyproject.toml"
PYTHON_VERSION = "3.11"
LOCKS = {"service.txt": ("bundled",), "dev.txt": ("demo", "test")}  # file -> extras
UNLOCKED = ("torch",)  # installed before the lock, by build (CPU or CUDA)
DIGEST_LINE = "# pyproject.toml dependencies sha256: "


def dependencies_digest(pyproject: Path = PYPROJECT) -> str:
    """sha256 of pyproject.toml's dependencies and optional dependencies, as parsed (comments do not count)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lists = {"dependencies": project.get("dependencies", []),
             "optional-dependencies": project.get("optional-dependencies", {})}
    return hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()


def compile_lock(name: str, extras: tuple[str, ...]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as overrides:
        # a marker that is never true drops the package from the resolution, with what only it needs
        overrides.write("".join(f'{package} ; sys_platform == "never"\n' for package in UNLOCKED))
        overrides.flush()
        command = ["uv", "pip", "compile", str(PYPROJECT), "--python-version", PYTHON_VERSION, "--generate-hashes",
                   "--overrides", overrides.name, "--no-header", "--quiet",
                   *(argument for extra in extras for argument in ("--extra", extra))]
        body = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    extras_text = f"[{','.join(extras)}]" if extras else ""
    header = (f"# icldaemon{extras_text} for Python {PYTHON_VERSION}, torch excluded (installed first, by build); "
              "regenerate with: python requirements/compile.py\n"
              f"{DIGEST_LINE}{dependencies_digest()}\n")
    (HERE / name).write_text(header + body, encoding="utf-8")


def main() -> int:
    for name, extras in LOCKS.items():
        compile_lock(name, extras)
        print(f"wrote requirements/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
