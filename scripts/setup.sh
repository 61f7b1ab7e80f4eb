#!/usr/bin/env bash
# Creates .venv (if missing) and installs negprompt with its test tools and the web extra (negprompt
# serve), CPU PyTorch first; then Chromium for the browser tests where it can (scripts/install_browser.sh).
# PyTorch is pinned here (not in pyproject) so that a fresh venv takes the CPU wheel instead of a
# multi-GB CUDA build; users with GPUs install their own torch (pyproject asks for torch>=2.1,<3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v -i warning || true
.venv/bin/python -m pip install -q -e ".[test,web]" 2>&1 | grep -v -i warning || true
bash scripts/install_browser.sh >/dev/null ||
    echo "setup: no Chromium, so tests/test_web_browser.py will fail; everything else works" >&2
.venv/bin/python -c "import negprompt, torch; print(f'negprompt {negprompt.__version__} ready (torch {torch.__version__})')"
