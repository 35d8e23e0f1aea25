"""Check that compiled batchnorm code runs on any x86-64: no AVX outside the per-ISA kernels.

Usage: python tools/check_isa.py FILE... (shared objects, static libraries or object files)

The library is built without -m/-march flags; only the kernels inside the target regions of
cpp/src/kernels_avx2.cpp and kernels_avx512.cpp (namespaces batchnorm::detail::avx2 and
::avx512) may use AVX, AVX2, FMA, F16C, AVX-512 or BMI instructions, and the dispatcher calls
them only on a CPU that has them. This disassembles every function (objdump -d) and fails if
any other function uses such an instruction: that is what a stray -mavx2 on a file, or an
inline function compiled inside a target region and merged by the linker with the baseline
copy (NumPy issue 25274), would look like. It also fails if no kernel uses AVX at all, so a
check that sees nothing cannot pass by accident.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

# The namespaces whose functions are compiled for an instruction set above the baseline.
_ISA_NAMESPACE = re.compile(r"batchnorm::detail::avx(2|512)::")
# VEX/EVEX-encoded instructions start with "v" (vmovups, vfmadd231ps, vcvtph2ps, ...) and
# AVX-512 mask instructions with "k"; BMI1/BMI2, LZCNT and POPCNT are above x86-64 too.
# (objdump prints the baseline "rep bsf" as tzcnt, so tzcnt is not on the list.)
_ABOVE_BASELINE = re.compile(r"^(v|k)[a-z0-9]+$|^(andn|bextr|blsi|blsmsk|blsr|bzhi|mulx|pdep|pext|rorx|s[ah][lr]x)$")
_FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
_INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\s+(\S+)")
_BASELINE_EXCEPTIONS = {"popcnt", "lzcnt"}  # listed separately below: x86-64-v2, not baseline


def _strip_brackets(name: str) -> str:
    """The name without template arguments and parameter lists (balanced <...> and (...))."""
    out: list[str] = []
    depth = 0
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)" and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _is_above_baseline(mnemonic: str) -> bool:
    return bool(_ABOVE_BASELINE.match(mnemonic)) or mnemonic in _BASELINE_EXCEPTIONS


def has_symbols(path: str) -> bool:
    """Whether the file has a symbol table (a stripped shared object cannot be checked per function)."""
    sections = subprocess.run(["readelf", "-S", "-W", path], check=True, capture_output=True, text=True).stdout
    return ".symtab" in sections


def check(path: str) -> tuple[int, int, list[str]]:
    """(functions, per-ISA functions with AVX, violations) of one file."""
    text = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", path], check=True, capture_output=True, text=True
    ).stdout
    functions = 0
    kernels_with_avx = 0
    violations: list[str] = []
    name = ""
    found: Counter[str] = Counter()

    def close() -> None:
        nonlocal kernels_with_avx
        if not name or not found:
            return
        if _ISA_NAMESPACE.search(_strip_brackets(name)):
            kernels_with_avx += 1
        else:
            shown = ", ".join(f"{m} x{n}" for m, n in found.most_common(5))
            violations.append(f"{name if len(name) <= 160 else name[:157] + '...'}: {shown}")

    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            close()
            name = m.group(1)
            functions += 1
            found = Counter()
            continue
        m = _INSTRUCTION.match(line)
        if m and _is_above_baseline(m.group(1)):
            found[m.group(1)] += 1
    close()
    return functions, kernels_with_avx, violations


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    ok = True
    for path in paths:
        if not has_symbols(path):
            print(f"{path}: stripped, so its instructions cannot be told apart by function: FAILED")
            print("  check the static library or an unstripped build of the same code instead")
            ok = False
            continue
        functions, kernels, violations = check(path)
        status = "ok" if not violations and kernels else "FAILED"
        print(
            f"{path}: {functions} functions, {kernels} per-ISA kernels use AVX, "
            f"{len(violations)} other functions do: {status}"
        )
        for v in violations[:20]:
            print(f"  {v}")
        if not kernels:
            print("  no per-ISA kernel with AVX instructions found: is this the batchnorm library?")
        ok = ok and status == "ok"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
