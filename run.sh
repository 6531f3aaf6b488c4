#!/usr/bin/env bash
# One entry point for people and CI:  bash run.sh demo | bash run.sh test [pytest args...]
# Creates (or refreshes, when pyproject.toml changed) a virtual environment in .venv first.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
EXTRAS=dev,torch,tfds,export  # torch: the CPU wheel (pip install torch==2.13.0) for cross-checks; tfds: array_record datasets; export: jax2onnx + onnxruntime

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.stamp-$(sha1sum pyproject.toml | cut -c1-12)-$EXTRAS"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  rm -f "$VENV"/.stamp-* && touch "$stamp"
fi

cmd=${1:-demo}
shift || true
case "$cmd" in
  demo) exec "$VENV/bin/jaxyolo" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q -n 2 "$@" ;;
  *) exec "$VENV/bin/jaxyolo" "$cmd" "$@" ;;
esac
