# Shared by scripts/demo and scripts/test: create .venv and install moecpt into it once.
# torch first: `pip install torch==2.13.0` takes the CPU build from local disk on the project's machines;
# elsewhere it downloads the default build for the platform.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.moecpt-installed-$1
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  if [ "$1" = dev ]; then python -m pip install -q -e ".[dev]"; else python -m pip install -q -e .; fi
  touch "$stamp"
fi
