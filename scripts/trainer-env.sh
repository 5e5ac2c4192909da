#!/usr/bin/env bash
# Creates the trainer's Python environment (verl + torch), kept apart from the services' venv: the agent
# runs it as a child process (VERLYARD_TRAINER_PYTHON) and never imports torch or verl itself.
#
#   scripts/trainer-env.sh [DIR]      # default DIR: <repo>/.trainer-venv ; prints DIR/bin/python
#
# Idempotent: a stamp file records what was installed; a complete environment is left untouched.
# Order matters (docs: shared verl.md): torch==2.13.0 FIRST so pip takes the CPU wheel from the local
# wheel folder, and again in the second line so verl's resolution cannot swap it for a CUDA build.
# uvicorn/fastapi are imported by verl.trainer.sft_trainer without being declared; pandas/pyarrow
# write and read the parquet files. Every verl extra pins a CUDA torch: none is used.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-${VERLYARD_TRAINER_VENV:-$ROOT/.trainer-venv}}"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
VERL="verl==0.9.1"
REQS="$VERL uvicorn fastapi $TORCH pandas pyarrow"
STAMP="$DIR/.verlyard-trainer-env"
WANT="$TORCH | $REQS"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$DIR/bin/python" ]] &&
    "$DIR/bin/python" - >/dev/null 2>&1 <<'PY'; then
# Cheap: versions and importability without importing torch/verl (which takes many seconds).
import importlib.metadata as md, importlib.util as iu
assert md.version("verl") == "0.9.1" and md.version("torch").startswith("2.13.0")
assert all(iu.find_spec(m) for m in ("verl", "torch", "uvicorn", "fastapi", "pandas", "pyarrow"))
PY
    echo "trainer env: present at $DIR" >&2
    echo "$DIR/bin/python"
    exit 0
fi

echo "trainer env: building at $DIR (a few minutes on first build)" >&2
[[ -x "$DIR/bin/python" ]] || "$PYTHON" -m venv "$DIR"
rm -f "$STAMP"
# shellcheck disable=SC2086  # the requirement lists are meant to split into words
{
    "$DIR/bin/python" -m pip install -q --disable-pip-version-check $TORCH
    "$DIR/bin/python" -m pip install -q --disable-pip-version-check $REQS
} 2> >(grep -v "^WARNING: Location 'file://" >&2)
"$DIR/bin/python" -c "import verl, torch, uvicorn, pandas, pyarrow; assert verl.__version__ == '0.9.1', verl.__version__"
echo "$WANT" >"$STAMP"
echo "trainer env: ready at $DIR (VERLYARD_TRAINER_PYTHON=$DIR/bin/python)" >&2
echo "$DIR/bin/python"
