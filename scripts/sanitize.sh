#!/usr/bin/env bash
# Sanitizer builds of the C kernel, each in a throwaway directory (the installed package is never
# rebuilt), run on the kernel's tests:
#   1. kernels/tests/driver.c under ThreadSanitizer: the threaded training step, the threaded
#      optimizer and batched decoding (several slots per step, on the pool's threads) on 4 and
#      on 12 threads (no suppressions; built with MT_NO_TARGET_CLONES).
#   2. the same driver under AddressSanitizer + UndefinedBehaviorSanitizer, leaks checked.
#   3. both cffi modules (mpitrain._kernel and the test-only mpitrain._kernel_testing) built with
#      MPITRAIN_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer ..." and the Python
#      tests that call the kernel (tests/test_*.py naming ops, optim, Model, _native or
#      generate; not the torch comparisons, not the mpirun runs) run against it with libasan
#      preloaded.
# Any sanitizer report aborts its run, and the script exits non-zero.
#
# Usage: scripts/sanitize.sh [BUILD_DIR]     (default: a fresh temporary directory, removed after)
# Needs: gcc, and a Python with cffi, numpy, pytest and scipy-openblas32 (an activated venv with
# the package's test dependencies); PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}

if [[ $# -ge 1 ]]; then
    BUILD=$1
    mkdir -p "$BUILD"
else
    BUILD=$(mktemp -d "${TMPDIR:-/tmp}/mpitrain-sanitize.XXXXXX")
    trap 'rm -rf "$BUILD"' EXIT
fi
BUILD=$(cd "$BUILD" && pwd)

step() { printf '\n=== sanitize: %s (%s)\n' "$1" "$(date +%T)"; }

LIBDIR=$("$PY" -c 'import scipy_openblas32 as s; print(s.get_lib_dir())')
INCDIR=$("$PY" -c 'import scipy_openblas32 as s; print(s.get_include_dir())')
# The kernel runs its own threads; OpenBLAS (and numpy's OpenBLAS) stay single-threaded.
export OPENBLAS_NUM_THREADS=1

build_driver() {  # build_driver OUTPUT SANITIZER_FLAGS...
    local out=$1
    shift
    gcc -O1 -g -std=gnu11 -pthread -Wall -fno-omit-frame-pointer "$@" \
        -Ikernels -I"$INCDIR" -DBLAS_SYMBOL_PREFIX=scipy_ \
        kernels/*.c kernels/tests/driver.c \
        -L"$LIBDIR" -lscipy_openblas -lm -Wl,-rpath,"$LIBDIR" -o "$out"
}

step "ThreadSanitizer: C driver"
# Without GCC function multiversioning: its ifunc resolvers run while the program is relocated,
# before the TSan runtime is initialised, and instrumented resolvers crash there. The clones
# differ only in instruction set, not in which thread touches what; ASan below checks them all.
build_driver "$BUILD/driver_tsan" -fsanitize=thread -DMT_NO_TARGET_CLONES
for threads in 4 12; do
    TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1" "$BUILD/driver_tsan" "$threads"
done

step "AddressSanitizer + UndefinedBehaviorSanitizer: C driver"
build_driver "$BUILD/driver_asan" -fsanitize=address,undefined -fno-sanitize-recover=all
ASAN_OPTIONS="detect_leaks=1 abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1" \
    "$BUILD/driver_asan" 4

step "AddressSanitizer + UndefinedBehaviorSanitizer: kernel module and Python tests"
PYDIR=$BUILD/py
rm -rf "$PYDIR"
mkdir -p "$PYDIR"
cp -r mpitrain kernels tests scripts docs "$PYDIR"/
find "$PYDIR" \( -name '__pycache__' -o -name '_kernel*.so' -o -name '_kernel*.c' -o -name '*.o' \) \
    -prune -exec rm -rf {} +
(
    cd "$PYDIR"
    MPITRAIN_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -g" \
    LDFLAGS="-fsanitize=address,undefined" \
        "$PY" -c 'import sys; sys.path.insert(0, "kernels"); import build_kernel as b; b.ffibuilder.compile(tmpdir="."); b.testing_ffibuilder.compile(tmpdir=".")' \
        >"$BUILD/cffi_build.log" 2>&1 || { cat "$BUILD/cffi_build.log"; exit 1; }
)
mapfile -t TESTS < <(cd "$PYDIR" && grep -lE \
    'from mpitrain import .*\b(ops|optim|Model)\b|mpitrain\.(ops|optim|model|_native|generate)\b|from mpitrain\.(ops|optim|model|_native|generate) import' \
    tests/test_*.py | grep -v -e torch -e mpi | sort)
if [[ ${#TESTS[@]} -eq 0 ]]; then
    echo "sanitize: no kernel tests found" >&2
    exit 1
fi
echo "tests: ${TESTS[*]}"
(
    cd "$PYDIR"  # first on sys.path: this copy of mpitrain, not the installed one
    export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
    export ASAN_OPTIONS="detect_leaks=0 abort_on_error=1"
    export UBSAN_OPTIONS="print_stacktrace=1"
    "$PY" - "$PYDIR" <<'EOF'
import sys
from mpitrain._native import kernel, testing_kernel
kernel()  # loads libscipy_openblas first, as the package does
testing_kernel()
import mpitrain._kernel as k
import mpitrain._kernel_testing as kt
for mod in (k, kt):
    if not mod.__file__.startswith(sys.argv[1]):
        sys.exit(f"sanitize: imported {mod.__file__}, not the sanitizer build")
    print("kernel module:", mod.__file__)
EOF
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" "${TESTS[@]}"
)

step "all sanitizer runs clean"
