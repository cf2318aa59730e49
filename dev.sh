#!/usr/bin/env bash
# Set-up and entry point for a fresh Debian machine (also what CI runs).
#   ./dev.sh demo [ARGS]   install what is missing (emoji-sd[demo]), then run the whole pipeline on the demo site
#   ./dev.sh test [ARGS]   install what is missing (emoji-sd[test]: demo, dask, pytest, datasets), then run the tests
#   ./dev.sh setup         install only (emoji-sd[test], everything)
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
APT_PACKAGES=(chromium chromium-driver fonts-noto-color-emoji)

log() { printf '\033[1m[dev.sh]\033[0m %s\n' "$*" >&2; }

install_system() {
  local missing=()
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
  [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || missing+=(fonts-noto-color-emoji)
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  [ ${#missing[@]} -eq 0 ] && return
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_python() {
  local extra=$1  # demo or test (test includes demo)
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.emoji-sd-installed-$extra"
  local want
  want="$(cat pyproject.toml; echo "$TORCH_SPEC")"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  log "installing $TORCH_SPEC first (so no other torch build is pulled), then emoji-sd[$extra]"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC
  "$VENV/bin/python" -m pip install -q -e ".[$extra]"
  printf '%s' "$want" > "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) install_system; install_python test ;;
  demo) install_system; install_python demo; exec "$VENV/bin/emoji-sd" demo "$@" ;;
  test) install_system; install_python test; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./dev.sh {demo|test|setup} [ARGS...]" >&2; exit 2 ;;
esac
