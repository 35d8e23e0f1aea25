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
# clang 14 (Debian 12) rejects __builtin_cpu_supports("f16c") in cpp/src/dispatch.cpp
# ("invalid cpu feature string for builtin"); newer clangs accept it. Build a copy of the
# sources with that one test spelled "avx2" (every AVX2 CPU the library targets has F16C).
src=$build/src
mkdir -p "$src"
rm -rf "${src:?}/cpp" "$src/cmake"
cp -r "$root/CMakeLists.txt" "$root/cpp" "$src/"
if [ -d "$root/cmake" ]; then cp -r "$root/cmake" "$src/"; fi
if ! echo 'int main() { return __builtin_cpu_supports("f16c"); }' | clang++ -x c++ -fsyntax-only - 2> /dev/null; then
  sed -i 's/__builtin_cpu_supports("f16c")/__builtin_cpu_supports("avx2")/' "$src/cpp/src/dispatch.cpp"
fi
flags="-g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang \
  -DCMAKE_CXX_FLAGS="$flags -fsanitize=fuzzer-no-link" \
  -DBATCHNORM_BUILD_PYTHON=OFF -DBATCHNORM_BUILD_TESTS=OFF -DBATCHNORM_OPENMP=OFF -DBATCHNORM_INSTALL=OFF > /dev/null
cmake --build "$build" --target batchnorm > /dev/null
lib=$(find "$build" -maxdepth 2 -name 'libbatchnorm.a' -not -path "$src/*" | head -n 1)
# shellcheck disable=SC2086
clang++ -std=c++17 $flags -fsanitize=fuzzer -I"$src/cpp/include" -I"$build" \
  "$root/tests/fuzz/fuzz_core.cpp" "$lib" -o "$build/fuzz_core"
cd "$build"
if [ $# -eq 0 ]; then set -- -max_total_time=60; fi
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$build/fuzz_core" -timeout=20 -print_final_stats=1 "$@"
