#!/usr/bin/env bash
# Builds the C++ core with clang, AddressSanitizer, UndefinedBehaviorSanitizer and
# libFuzzer's coverage instrumentation, links tests/fuzz/fuzz_core.cpp against it, and
# runs it. Needs clang (Debian: apt-get install clang). Usage:
#
#   tests/fuzz/run_core_fuzzer.sh                          # 60 s
#   tests/fuzz/run_core_fuzzer.sh -max_total_time=3600 corpus/
#   tests/fuzz/run_core_fuzzer.sh crash-<sha1>             # replay a finding
#
# Arguments go to libFuzzer. OpenMP is off in this build (clang's libomp is not needed):
# the kernels run their single-thread paths; the threaded ones are fuzzed from Python.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BATCHNORM_FUZZ_BUILD:-$root/build/fuzz-core}
flags="-g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang \
  -DCMAKE_CXX_FLAGS="$flags -fsanitize=fuzzer-no-link" \
  -DBATCHNORM_BUILD_PYTHON=OFF -DBATCHNORM_BUILD_TESTS=OFF -DBATCHNORM_OPENMP=OFF -DBATCHNORM_INSTALL=OFF > /dev/null
cmake --build "$build" --target batchnorm > /dev/null
lib=$(find "$build" -maxdepth 2 -name 'libbatchnorm.a' | head -n 1)
# shellcheck disable=SC2086
clang++ -std=c++17 $flags -fsanitize=fuzzer -I"$root/cpp/include" -I"$build" \
  "$root/tests/fuzz/fuzz_core.cpp" "$lib" -o "$build/fuzz_core"
cd "$build"
if [ $# -eq 0 ]; then set -- -max_total_time=60; fi
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$build/fuzz_core" -timeout=20 -print_final_stats=1 "$@"
