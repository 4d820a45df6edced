# Sourced by scripts/test, scripts/run and .ci/run. `venv_ready EXTRAS` creates .venv with python3
# when it is missing and installs the project into it (editable, quietly) with EXTRAS, e.g.
# "test,dev"; the install is skipped while pyproject.toml is unchanged since the last one.
# Sets PGMIGRATE_ROOT (the checkout) and VENV (its .venv).

PGMIGRATE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$PGMIGRATE_ROOT/.venv"

venv_ready() {
  local extras=$1 stamp want
  stamp="$VENV/.pgmigrate-installed-${extras//,/-}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "+ python3 -m venv .venv" >&2
    python3 -m venv "$VENV" || return
  fi
  want=$(cksum <"$PGMIGRATE_ROOT/pyproject.toml")
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
    || ! "$VENV/bin/python" -c 'import pgmigrate_proxy' 2>/dev/null; then
    echo "+ pip install --quiet -e '.[$extras]'" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
      -e "$PGMIGRATE_ROOT[$extras]" || return
    printf '%s\n' "$want" >"$stamp"
  fi
}
