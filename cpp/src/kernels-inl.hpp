// The kernels, written once. This file and the ones it includes have no include guard on
// purpose: each kernels_<isa>.cpp includes it inside its own namespace
// (batchnorm::detail::<isa>) and its own target region, after defining
//   BATCHNORM_KERNEL_ISA   the instruction set's name ("baseline", "avx2", "avx512")
//   BATCHNORM_KERNEL_SIMD, BATCHNORM_KERNEL_FMA, BATCHNORM_KERNEL_F16C  (see simd-inl.hpp)
// so the same loops are compiled for each instruction set. Nothing here may be defined
// outside that namespace: a function compiled for AVX-512 must never be picked by the
// linker for baseline code.
//
// The files, by job:
//   simd-inl.hpp     the operations: vector types, loads and stores (partial ones too),
//                    conversions, arithmetic; the only file with instruction-set conditionals
//   general-inl.hpp  the pass arithmetic, the sums, the general loops' blocks, and the
//                    drivers that walk the runs of a runs kernel (direct or general body)
//   reduce-inl.hpp   reduce-1 and reduce-2, rows and runs
//   affine-inl.hpp   affine-1 and affine-2, rows and runs
//   this file        the table
//
// A new kernel, e.g. the reduction weighted by a mask read beside x (reduce1w): its run
// body and its rows and runs forms go in reduce-inl.hpp (the runs form hands the body and
// the inputs x and mask to reduce_runs, which walks the runs and picks direct or general
// loops), its KernelTable entry in kernels.hpp and its address in make_table below; the
// schedule then calls it. (The mask has x's element type, so it needs no loads of its own.)

#include "simd-inl.hpp"

#include "general-inl.hpp"

#include "reduce-inl.hpp"

#include "affine-inl.hpp"

template <class T>
KernelTable<T> make_table() {
  return {&reduce1_rows<T>,  &reduce1_runs<T>,  &affine1_rows<T>,  &affine1_runs<T>,
          &reduce2_rows<T>,  &reduce2_runs<T>,  &affine2_rows<T>,  &affine2_runs<T>,
          &reduce1w_rows<T>, &reduce1w_runs<T>, &affine2w_rows<T>, &affine2w_runs<T>};
}

const Tables* tables() {
  static const Tables t{BATCHNORM_KERNEL_ISA, make_table<float>(), make_table<double>(), make_table<float16_t>(),
                        make_table<bfloat16_t>()};
  return &t;
}
