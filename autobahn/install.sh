#!/usr/bin/env bash
# Install the Autobahn TestSuite (wstest, PyPI autobahntestsuite 0.8.2) into a private
# Python 2.7 virtualenv, outside the repository and outside pyenv's own site-packages.
#
# Usage: autobahn/install.sh            # prints the path of the wstest executable on stdout
#
# Environment:
#   RINGGATE_AUTOBAHN_HOME  where the virtualenv lives
#                           (default: ${XDG_CACHE_HOME:-$HOME/.cache}/ringgate/autobahn-py27)
#   RINGGATE_PY27           a CPython 2.7 interpreter to use instead of pyenv's 2.7.18
#
# Idempotent: a stamp file records a hash of everything that decides the install (the pins below,
# constraints-py27.txt, the interpreter). If it matches and wstest imports, we exit in ~0.3 s.
# Anything else (first run, changed pins, interrupted install) rebuilds the venv from scratch,
# because a half-installed Twisted is harder to diagnose than a fresh install is slow.
#
# Only progress messages go to stderr; stdout carries just the wstest path, so callers can do
# WSTEST=$(autobahn/install.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
constraints="$here/constraints-py27.txt"

# Versions known to work with autobahntestsuite 0.8.2 on 2.7.18 (see ../shared/autobahn/README.md).
# virtualenv 16.7.x is the last single-module, dependency-free release that runs on 2.7 itself,
# so bootstrapping it needs nothing but the interpreter's own pip.
readonly PY27_VERSION=2.7.18
readonly VIRTUALENV_PIN=virtualenv==16.7.12
readonly PIP_PIN=pip==20.3.4
readonly SETUPTOOLS_PIN=setuptools==44.1.1
readonly WHEEL_PIN=wheel==0.37.1
readonly INCREMENTAL_PIN=incremental==16.10.1
readonly AUTOBAHN_PIN=autobahntestsuite==0.8.2

home=${RINGGATE_AUTOBAHN_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/ringgate/autobahn-py27}
venv="$home/venv"
stamp="$venv/.ringgate-install-stamp"

log() { printf 'autobahn/install.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Python 2.7 and its pip print deprecation banners on every call; they are noise here.
export PYTHONWARNINGS=ignore
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_PYTHON_VERSION_WARNING=1

[[ -r "$constraints" ]] || die "missing $constraints"

find_py27() {
    if [[ -n "${RINGGATE_PY27:-}" ]]; then
        [[ -x "$RINGGATE_PY27" ]] || die "RINGGATE_PY27=$RINGGATE_PY27 is not executable"
        printf '%s\n' "$RINGGATE_PY27"
        return
    fi
    # Non-interactive shells (CI steps) often lack pyenv's PATH setup; look where it installs itself.
    local pyenv_bin root py
    pyenv_bin=$(command -v pyenv 2>/dev/null || true)
    if [[ -z "$pyenv_bin" && -x "${PYENV_ROOT:-$HOME/.pyenv}/bin/pyenv" ]]; then
        pyenv_bin="${PYENV_ROOT:-$HOME/.pyenv}/bin/pyenv"
    fi
    [[ -n "$pyenv_bin" ]] \
        || die "pyenv not found (PATH, \$PYENV_ROOT, ~/.pyenv); install pyenv with CPython $PY27_VERSION, or set RINGGATE_PY27=/path/to/python2.7"
    root=$("$pyenv_bin" root)
    py="$root/versions/$PY27_VERSION/bin/python"
    if [[ ! -x "$py" ]]; then
        log "pyenv has no $PY27_VERSION; trying 'pyenv install $PY27_VERSION' (needs a C toolchain, takes minutes)"
        "$pyenv_bin" install --skip-existing "$PY27_VERSION" >&2 \
            || die "'pyenv install $PY27_VERSION' failed; wstest only runs on Python 2.7. Install CPython $PY27_VERSION by hand, or set RINGGATE_PY27=/path/to/python2.7"
        [[ -x "$py" ]] || die "'pyenv install $PY27_VERSION' succeeded but $py is missing"
    fi
    printf '%s\n' "$py"
}

py27=$(find_py27)
"$py27" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' \
    || die "$py27 is not Python 2.7; wstest 0.8.2 runs on nothing else"

# Everything that should force a rebuild when it changes.
want_stamp=$(
    {
        printf '%s\n' "$py27" "$VIRTUALENV_PIN" "$PIP_PIN" "$SETUPTOOLS_PIN" "$WHEEL_PIN" \
            "$INCREMENTAL_PIN" "$AUTOBAHN_PIN"
        cat "$constraints"
    } | sha256sum | cut -d' ' -f1
)

is_installed() {
    [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" && -x "$venv/bin/wstest" ]] \
        && "$venv/bin/python" -c 'import autobahntestsuite' >/dev/null 2>&1
}

mkdir -p "$home"
# Two CI jobs sharing a cache must not build the same venv at once.
exec 9>"$home/.lock"
flock 9

if is_installed; then
    printf '%s\n' "$venv/bin/wstest"
    exit 0
fi

log "installing $AUTOBAHN_PIN into $venv (with $py27)"

rm -rf "$venv"
bootstrap=$(mktemp -d "$home/bootstrap.XXXXXX")
trap 'rm -rf "$bootstrap"' EXIT

# --target keeps virtualenv out of the interpreter's site-packages (pyenv's 2.7.18 stays pristine).
"$py27" -m pip install --quiet --progress-bar off --target "$bootstrap" "$VIRTUALENV_PIN" >&2
PYTHONPATH="$bootstrap" "$py27" -m virtualenv --quiet --no-download "$venv" >&2

vpip=("$venv/bin/python" -m pip install --progress-bar off)
# Order matters (from the shared README): a pip that understands the pins' wheels first, then
# incremental, which Twisted's setup.py imports, then the suite itself, all under the constraints.
"${vpip[@]}" -U "$PIP_PIN" "$SETUPTOOLS_PIN" "$WHEEL_PIN" >&2
"${vpip[@]}" -c "$constraints" "$INCREMENTAL_PIN" >&2
"${vpip[@]}" -c "$constraints" "$AUTOBAHN_PIN" >&2

[[ -x "$venv/bin/wstest" ]] || die "pip finished but $venv/bin/wstest is missing"
"$venv/bin/python" -c 'import autobahntestsuite' \
    || die "wstest is installed but autobahntestsuite does not import; see pip output above"

# Written last: an interrupted install leaves no stamp and is redone next time.
printf '%s\n' "$want_stamp" >"$stamp"
log "done"
printf '%s\n' "$venv/bin/wstest"
