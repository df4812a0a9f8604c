#!/usr/bin/env bash
# Tests the core library against the newest jax, jaxlib, flax, optax, chex, orbax-checkpoint,
# ml-collections and numpy on the package index, in a fresh virtual environment without
# TensorFlow (the core install plus the test tools).
#
#   scripts/check_latest.sh                      # venv in a temporary folder, removed at the end
#   PYTHON=python3.13 VENV=/tmp/venv-latest KEEP_VENV=1 scripts/check_latest.sh
#   scripts/check_latest.sh tests/test_losses.py -k golden     # other pytest arguments
#
# PYTHON defaults to python3.12: jax 0.11 and later need Python >= 3.12. The script prints the
# versions it installed, then runs the loss, model, step and packaging tests (TESTS below; any
# arguments replace them). It runs pytest in one process: the machine may be shared.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.12}"
if ! "$PYTHON" --version >/dev/null 2>&1 && command -v pyenv >/dev/null; then
  # A pyenv shim answers only for the selected versions: ask pyenv for the installed one.
  PYTHON="$(pyenv prefix "$(pyenv versions --bare | grep -E "^${PYTHON#python}" | tail -1)")/bin/python"
fi
VENV="${VENV:-$(mktemp -d)/venv}"
NEWEST=(jax jaxlib flax optax chex orbax-checkpoint ml-collections numpy)
# The tests that need only the core install: the losses, models, theory checks, optimisers, train
# step (pmap over 1 and 8 devices, shard_map), metric files, evaluators, packaging, the lazy
# package import and the examples; the few of them that train on digits skip without TFDS or
# scikit-learn.
TESTS=(
  tests/test_losses.py
  tests/test_losses_hardening.py
  tests/test_losses_queue.py
  tests/test_losses_registry.py
  tests/test_losses_precision.py
  tests/test_losses_parallel.py
  tests/test_losses_multiview.py
  tests/test_losses_input_checks.py
  tests/test_models.py
  tests/test_theory.py
  tests/test_optim.py
  tests/test_step.py
  tests/test_metrics.py
  tests/test_evaluate.py
  tests/test_packaging.py
  tests/test_docs_api.py
  tests/test_examples.py
)
if [[ $# -gt 0 ]]; then TESTS=("$@"); fi

if [[ -z "${KEEP_VENV:-}" ]]; then trap 'rm -rf "$VENV"' EXIT; fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# --upgrade-strategy eager: the newest release of every dependency, not just of the named ones.
"$VENV/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager \
  -e ".[test]" "${NEWEST[@]}"

echo "== installed with $("$VENV/bin/python" --version)"
"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
  | grep -i -E "^($(IFS='|'; echo "${NEWEST[*]}" | sed 's/-/[-_]/g'))==" | sed 's/^/  /'
if "$VENV/bin/python" -c "import tensorflow" 2>/dev/null; then
  echo "TensorFlow is installed in the core environment: the core must not need it" >&2
  exit 1
fi

# An editable install imports this checkout; PYTHONPATH is cleared so nothing else shadows it.
PYTHONPATH= "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
