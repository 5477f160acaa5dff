#!/usr/bin/env bash
# Tools of the Metal kernel tests (tests/metal) and of the test builds of
# the package (tests/support/variants.py: planted faults, the CPU path under
# sanitizers), on a fresh Debian machine, as root; installs only what is
# missing, so a second run is quick.
#   g++ with ThreadSanitizer, AddressSanitizer and
#   UndefinedBehaviorSanitizer, addr2line                       (apt)
#   clang for the Metal lint: the `ziglang` wheel ships one     (pip)
#   cmake, ninja, nanobind for the build-wiring test and the
#   test builds                                                 (pip)
# Python packages go into $VENV (default .venv), as ./run.sh uses it.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

sanitizers_work() {
  local tmp
  tmp=$(mktemp -d)
  echo 'int main() { return 0; }' > "$tmp/t.cpp"
  g++ -fsanitize=thread "$tmp/t.cpp" -o "$tmp/t" 2>/dev/null &&
    g++ -fsanitize=address,undefined "$tmp/t.cpp" -o "$tmp/t" 2>/dev/null &&
    [[ "$(g++ -print-file-name=libasan.so)" == /* ]] &&
    [[ "$(g++ -print-file-name=libubsan.so)" == /* ]] &&
    command -v addr2line >/dev/null
  local ok=$?
  rm -rf "$tmp"
  return $ok
}

if ! command -v g++ >/dev/null || ! sanitizers_work; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ binutils >/dev/null
fi

pip_missing=()
"$PY" -c "import ziglang" 2>/dev/null || pip_missing+=(ziglang)
"$PY" -m nanobind --cmake_dir >/dev/null 2>&1 || pip_missing+=("nanobind==3.0.1")
command -v cmake >/dev/null || [ -x "$VENV/bin/cmake" ] || pip_missing+=(cmake)
command -v ninja >/dev/null || [ -x "$VENV/bin/ninja" ] || pip_missing+=(ninja)
if [ ${#pip_missing[@]} -gt 0 ]; then
  "$PY" -m pip install -q "${pip_missing[@]}"
fi
