#!/usr/bin/env bash
# The prepared GPU check of issue 11 (at most ~8 minutes on an H200): the GPU tests, then the CUDA benchmark
# rows (issue 11's figures: LARS flat and not, eager, fused, CUDA graphs, the backend, compiled SGD; then the
# step table of every peer), all written under $OUT (default ./gpu_out). Each stage runs under `timeout`
# within one overall budget, the script goes on past a failed stage, and $OUT/stages.md lists every stage's
# exit status, seconds and log. The figure table is rewritten after each figure set, so a stage cut short
# keeps what it finished.
#
#   bash benchmarks/gpu_check.sh                                                 # on the GPU machine
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=tiny OUT=/tmp/gc bash benchmarks/gpu_check.sh    # on a CPU
#
# The repository may arrive without its .venv, torch preinstalled and no network: lars-fx is then installed
# editable without dependencies (offline pip), or, where pip cannot, imported from the tree itself with
# PYTHONPATH=. (passes/ linked in as lars_fx/passes, the backend's entry point declared in $OUT/site).
#
# Settings (environment): OUT, PYTHON (python3), GPU_CHECK_DEVICE (cuda | cpu), GPU_CHECK_SIZE (full | tiny:
# small shapes and few steps), GPU_CHECK_BUDGET_S (470: the whole script's seconds), GPU_CHECK_INSTALL
# (auto | pip | path).
set -u

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SIZE=${GPU_CHECK_SIZE:-full}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
INSTALL=${GPU_CHECK_INSTALL:-auto}
DEADLINE=$((SECONDS + BUDGET_S))

case $SIZE in
    full) SIZE_ARGS=(--iters 50) ;;
    tiny) SIZE_ARGS=(--reduced --iters 3) ;;
    *) echo "GPU_CHECK_SIZE must be full or tiny, got $SIZE" >&2; exit 2 ;;
esac

printf '| stage | exit | seconds | log |\n|---|---:|---:|---|\n' > "$OUT/stages.md"

# stage NAME MAX_SECONDS COMMAND...: run COMMAND (a program or a function of this script) under timeout (at
# most MAX_SECONDS, never past the deadline), its output in $OUT/NAME.log, its line in stages.md; never stops
# the script.
stage() {
    local name=$1 max=$2
    shift 2
    if declare -F "$1" > /dev/null; then set -- bash -c '"$@"' "$1" "$@"; fi
    local left=$((DEADLINE - SECONDS))
    local limit=$((max < left ? max : left))
    local log="$OUT/$name.log"
    if ((limit < 15)); then
        echo "skipped: ${left} s of the ${BUDGET_S} s budget left" > "$log"
        printf '| %s | skipped | 0 | %s.log |\n' "$name" "$name" >> "$OUT/stages.md"
        echo "== $name: skipped (no time left)"
        return 0
    fi
    echo "== $name (at most ${limit} s)"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    local status=$rc
    if ((rc == 124 || rc == 137)); then status="$rc (timed out at ${limit} s)"; fi
    printf '| %s | %s | %d | %s.log |\n' "$name" "$status" $((SECONDS - start)) "$name" >> "$OUT/stages.md"
    echo "   exit $status after $((SECONDS - start)) s; last lines of $log:"
    tail -n 5 "$log" | sed 's/^/   | /'
}

check_environment() {
    date -u
    echo "repository: $REPO, commit $(git -C "$REPO" rev-parse --short HEAD 2> /dev/null || echo unknown)"
    echo "device: $DEVICE, size: $SIZE, budget: $BUDGET_S s"
    command -v nvidia-smi > /dev/null && nvidia-smi
    "$PYTHON" - <<'EOF'
import os, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    memory = torch.cuda.get_device_properties(0).total_memory
    print("gpu", torch.cuda.get_device_name(), memory // 2**30, "GiB")
print("cpu cores", len(os.sched_getaffinity(0)), "torch threads", torch.get_num_threads())
for name in ("triton", "pytest", "hypothesis", "numpy", "onnx", "onnxruntime", "sklearn"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "missing:", type(error).__name__)
EOF
}

# Whether lars_fx and lars_fx.passes import, from this tree, with the backend's entry point.
lars_fx_ready() {
    "$PYTHON" - "$REPO" <<'EOF'
import os, sys
from importlib.metadata import entry_points
import lars_fx, lars_fx.passes
here = os.path.realpath(os.path.dirname(lars_fx.__file__))
if here != os.path.realpath(os.path.join(sys.argv[1], "lars_fx")):
    sys.exit(f"lars_fx imports from {here}, not from this tree")
if not any(e.name == "lars_fx" for e in entry_points(group="torch_dynamo_backends")):
    sys.exit("no torch_dynamo_backends entry point named lars_fx")
print("lars_fx from", here)
EOF
}

# PYTHONPATH=. with passes/ linked in as lars_fx/passes (a throwaway copy of the tree), and the backend's
# entry point declared by a bare distribution in $OUT/site.
use_source_tree() {
    [ -e lars_fx/passes ] || ln -s ../passes lars_fx/passes
    local info="$OUT/site/lars_fx-0.0.0.dist-info"
    mkdir -p "$info"
    printf 'Metadata-Version: 2.1\nName: lars-fx\nVersion: 0.0.0\n' > "$info/METADATA"
    printf '[torch_dynamo_backends]\nlars_fx = lars_fx.backend:lars_fx_backend\n' > "$info/entry_points.txt"
    export PYTHONPATH="$REPO:$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
}

# Makes lars_fx importable; writes how to $OUT/install_mode (installed | path), which the script reads after.
check_install() {
    if [ "$INSTALL" = auto ] && lars_fx_ready; then
        echo "already installed"
        echo installed > "$OUT/install_mode"
        return 0
    fi
    if [ "$INSTALL" != path ]; then
        echo "pip install -e . --no-deps (offline, no build isolation)"
        if "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e . && lars_fx_ready; then
            echo installed > "$OUT/install_mode"
            return 0
        fi
        [ "$INSTALL" = pip ] && return 1
    fi
    echo "PYTHONPATH=. with lars_fx/passes linked in"
    echo path > "$OUT/install_mode"
    use_source_tree
    lars_fx_ready
}

check_tests() {
    "$PYTHON" -c "import pytest" || { echo "pytest is not installed: no tests"; return 127; }
    # -k matches markers too: the tests marked gpu, and any with cuda in its name or parameters
    "$PYTHON" -m pytest -q -m "not slow" -k "gpu or cuda" -p no:cacheprovider -rs \
        --continue-on-collection-errors --junitxml="$OUT/tests.xml" tests/
}

export OUT REPO PYTHON DEVICE SIZE BUDGET_S INSTALL
# exported functions reach child bash processes too: their names must not shadow a command
export -f check_environment lars_fx_ready use_source_tree check_install check_tests

echo "gpu_check: device $DEVICE, size $SIZE, output in $OUT"
rm -f "$OUT/install_mode"
stage environment 30 check_environment
stage install 90 check_install
if [ "$(cat "$OUT/install_mode" 2> /dev/null)" = path ]; then
    use_source_tree  # the install stage ran in a child process: its PYTHONPATH is set here again
fi
stage tests 140 check_tests
# Each benchmark stage is a process of its own: it pays Inductor's start-up once, in a throwaway compile
# (its seconds are in the tables' headers), before any peer compiles.
# The GPU targets first (ResNet-50 and ViT-L against their memory floor, first compiles); the many-tensor
# compiles last: a set cut short by the timeout leaves the table of those before it.
stage flat_figures 240 "$PYTHON" -u benchmarks/bench_flat.py --device "$DEVICE" "${SIZE_ARGS[@]}" \
    --figures resnet50,vitl,host,small_1000,small_10000 --out "$OUT/flat_figures_$DEVICE.md"
# Every peer (timm's Lars compiled, CUDA graphs, ...) on ResNet-50's shapes, in what time is left.
stage step_table 150 "$PYTHON" -u benchmarks/bench_step.py --device "$DEVICE" --model resnet50 \
    "${SIZE_ARGS[@]}" --out "$OUT/step_resnet50_$DEVICE.md"

echo
cat "$OUT/stages.md"
echo "tables and logs: $OUT"
