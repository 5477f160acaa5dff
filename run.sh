#!/usr/bin/env bash
# Set up and run mlx-fused-adafactor on a fresh machine.
#
#   ./run.sh bench [args]   build, install, and benchmark against stock MLX Adafactor
#   ./run.sh test  [args]   build, install, and run the test suite
#
# Everything goes into a virtual environment (.venv, or $VENV); the package
# is built from this checkout against the MLX it pins.
set -euo pipefail
cd "$(dirname "$0")"

cmd=${1:-}
[ $# -gt 0 ] && shift
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# mlx on macOS; on Linux the CPU backend through the [cpu] extra.
case "$(uname -s)" in
  Darwin) backend="" ;;
  *) backend="cpu," ;;
esac

setup() {
  local extras=$1
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q ".[${backend}${extras}]"
}

case "$cmd" in
  bench)
    setup bench
    exec "$VENV/bin/python" -m bench "$@"
    ;;
  test)
    setup test
    # Compilers and sanitizers for the Metal emulation (tests/metal).
    if [ -x tests/metal/setup.sh ]; then
      tests/metal/setup.sh
    fi
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh bench|test [args...]" >&2
    exit 2
    ;;
esac
