#!/usr/bin/env bash
# All set-up on a fresh clone: a virtual environment in .venv with backdoorlab installed (editable),
# torch pinned to the CPU wheel through constraints.txt, and the offline Fashion-MNIST files when
# this machine can install Debian packages. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
EXTRAS=${BACKDOORLAB_EXTRAS:-test,ray}
if ! .venv/bin/python -c "import backdoorlab, torch, pytest, ray" >/dev/null 2>&1 || [ "${BACKDOORLAB_REINSTALL:-0}" = 1 ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -c constraints.txt -e ".[${EXTRAS}]"
fi
# Fashion-MNIST ships as a Debian package (IDX files under /usr/share/datasets/fashion-mnist).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || echo "note: could not install dataset-fashion-mnist; fashion-mnist runs need --data-root" >&2
fi
