# moonwalk_optimize(<target>...)
#
# Optimisation for Moonwalk's programs that measure or train (benchmarks,
# examples): -O3, and -march=native when MOONWALK_NATIVE is ON (the default),
# so Eigen's own kernels use the host's vector instructions. Never applied to
# the INTERFACE target `moonwalk`, nor to the tests (they check results, not
# speed, and must build anywhere).
include_guard(GLOBAL)
include(CheckCXXCompilerFlag)

option(MOONWALK_NATIVE "Build benchmarks and examples with -O3 -march=native" ON)
if(NOT MSVC)
  check_cxx_compiler_flag(-march=native MOONWALK_HAVE_MARCH_NATIVE)
endif()

function(moonwalk_optimize)
  if(MSVC)
    return()
  endif()
  foreach(target IN LISTS ARGN)
    target_compile_options(${target} PRIVATE -O3)
    if(MOONWALK_NATIVE AND MOONWALK_HAVE_MARCH_NATIVE)
      target_compile_options(${target} PRIVATE -march=native)
      # GCC < 13 warns about its own AVX-512 intrinsics (`__m256d __Y = __Y;`
      # in avxintrin.h, inlined into Eigen's reductions and, as "is used
      # uninitialized", into the GEMM and triangular-solve kernels that
      # core/dense.hpp calls): a false positive, GCC PR 105593, fixed in GCC 13.
      if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
        target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized -Wno-uninitialized)
      endif()
    endif()
  endforeach()
endfunction()
