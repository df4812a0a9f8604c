#!/usr/bin/env bash
# Rewrites constraints.txt, the exact versions CI installs: installs the project with every extra
# into a fresh virtual environment and records the version of each package that came in.
#
#   scripts/update_constraints.sh                      # the newest versions pyproject.toml allows
#   scripts/update_constraints.sh -c constraints.txt   # keep today's versions, lock what is new
#
# Arguments go to `pip install`. PYTHON (default python3.11) is the interpreter CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet -e ".[data,plot,test,docs]" "$@"
"$WORK/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v -E "^pip==" >"$WORK/frozen"
tf_cpu="$(grep -i -E "^tensorflow[-_]cpu==" "$WORK/frozen" | cut -d= -f3)"
{
  echo "# Exact versions for CI and for reproducing a run: every package that"
  echo "# \`pip install -c constraints.txt -e \".[data,plot,test,docs]\"\` installs on $("$PYTHON" --version),"
  echo "# $(uname -m) Linux. pyproject.toml holds the ranges the library accepts; this file holds the"
  echo "# one set CI tests. Regenerate after changing dependencies: scripts/update_constraints.sh."
  sort -f "$WORK/frozen"
  if [[ -n "$tf_cpu" ]]; then
    echo "# tensorflow-cpu's counterpart off x86_64."
    echo "tensorflow==$tf_cpu"
  fi
} >constraints.txt
echo "constraints.txt: $(grep -c "==" constraints.txt) packages"
