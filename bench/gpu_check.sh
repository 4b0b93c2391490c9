#!/usr/bin/env bash
# The GPU checks in one call (see bench/gpu_check.py for what they are).
#
#   bash bench/gpu_check.sh --prepare   here, once, with the network: fetch what the GPU machine lacks
#                                       (wheels for its Python 3.12, TRL 1.5.0 for the peer run, SmolLM2's
#                                       tokenizer and config) into bench/.gpu-carry (about 50 MB, git-ignored)
#   bash bench/gpu_check.sh             on the GPU machine (no network): install the carried wheels that
#                                       are missing there, then run the checks (at most about 9 minutes);
#                                       results in bench/results/gpu.json
#   bash bench/gpu_check.sh --dry-run   on a CPU (CI runs it): the same align stages on the tiny model
#
# Through the device tool: run(command="bash bench/gpu_check.sh", carry=["bench/.gpu-carry"], timeout_s=590)
# ($OUT alone comes back from that machine: add --out $OUT/gpu.json, and copy what else you want under $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=bench/.gpu-carry
# What the lent machine's image lacks (it has torch, transformers, peft, accelerate, typer, pyarrow, pandas).
MISSING="trl==1.16.0 datasets==5.2.0 pydantic==2.14.4 pydantic-core annotated-types typing-inspection dill multiprocess bitsandbytes==0.50.2"

case "${1:-}" in
  --prepare)
    PY=${PYTHON:-.venv/bin/python}
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
    for spec in $MISSING trl==1.5.0; do
      "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform any -d "$CARRY/wheels" "$spec" 2>&1 | grep -v "^WARNING: Location" || true
    done
    mkdir -p "$CARRY/trl-1.5.0"
    unzip -q -o "$CARRY"/wheels/trl-1.5.0-*.whl -d "$CARRY/trl-1.5.0"
    rm "$CARRY"/wheels/trl-1.5.0-*.whl
    "$PY" - <<'PYEOF'
import shutil
from pathlib import Path
from align.models import ensure_builtin
source, target = ensure_builtin("smollm2-135m-instruct"), Path("bench/.gpu-carry/smollm2")
target.mkdir(parents=True, exist_ok=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    if (source / name).exists():
        shutil.copy(source / name, target / name)
PYEOF
    du -sh "$CARRY"
    exit 0 ;;
  --dry-run)
    PY=${PYTHON:-.venv/bin/python}
    exec "$PY" bench/gpu_check.py --dry-run "${@:2}" ;;
esac

PY=${PYTHON:-python3}
need=()
for spec in $MISSING; do
  module=$(echo "${spec%%==*}" | tr - _)
  "$PY" -c "import $module" 2>/dev/null || need+=("${spec%%==*}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing from $CARRY/wheels: ${need[*]}"
  "$PY" -m pip install -q --no-index --no-deps --find-links "$CARRY/wheels" "${need[@]}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 560 "$PY" bench/gpu_check.py "$@"
