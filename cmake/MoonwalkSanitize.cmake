# Sanitizer and fuzzing builds of Moonwalk's own test programs.
#
#   MOONWALK_SANITIZE=ON  builds moonwalk_sanitize_tests (the fast tests: io,
#                         data, core, losses, optim, the spec parser) and the
#                         fault tests with AddressSanitizer + UndefinedBehavior-
#                         Sanitizer, every report fatal (-fno-sanitize-recover=all).
#   MOONWALK_FUZZ=ON      builds the libFuzzer harnesses of tests/fuzz/ (needs
#                         clang: -fsanitize=fuzzer,address,undefined).
#
# Both are meant for a build directory of their own, e.g.
#   cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug \
#         -DMOONWALK_BUILD_TESTS=OFF -DMOONWALK_BUILD_EXAMPLES=OFF -DMOONWALK_SANITIZE=ON -DMOONWALK_FUZZ=ON
# Debug keeps assertions (Eigen's bounds checks included); the targets add -O1.
include_guard(GLOBAL)
include(CheckCXXSourceCompiles)
include(CMakePushCheckState)

option(MOONWALK_SANITIZE "Build the fast tests and the fault tests with ASan + UBSan" OFF)
option(MOONWALK_FUZZ "Build the libFuzzer harnesses in tests/fuzz (clang only)" OFF)

# float-cast-overflow is part of clang's -fsanitize=undefined but not of GCC's.
set(MOONWALK_SANITIZER_FLAGS -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all
    -fno-omit-frame-pointer)

# _moonwalk_require_flags(<what> <flags-list> <hint>): FATAL_ERROR with <hint>
# unless a program compiles and links with <flags-list>.
function(_moonwalk_require_flags what flags hint)
  cmake_push_check_state(RESET)
  string(REPLACE ";" " " CMAKE_REQUIRED_FLAGS "${flags}")
  set(CMAKE_REQUIRED_LINK_OPTIONS ${flags})
  string(MAKE_C_IDENTIFIER "MOONWALK_HAVE_${what}" _var)
  if(what STREQUAL "fuzzer")
    check_cxx_source_compiles([[
      #include <cstddef>
      #include <cstdint>
      extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t*, std::size_t) { return 0; }
    ]] ${_var})
  else()
    check_cxx_source_compiles("int main() { return 0; }" ${_var})
  endif()
  cmake_pop_check_state()
  if(NOT ${_var})
    message(FATAL_ERROR "${hint}")
  endif()
endfunction()

if(MOONWALK_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR
      "MOONWALK_FUZZ=ON needs clang (libFuzzer), but this build uses ${CMAKE_CXX_COMPILER_ID} "
      "(${CMAKE_CXX_COMPILER}). Configure a fresh build directory with -DCMAKE_CXX_COMPILER=clang++ "
      "(Debian: apt-get install clang libclang-rt-14-dev).")
  endif()
  _moonwalk_require_flags(fuzzer "-fsanitize=fuzzer,address,undefined"
    "MOONWALK_FUZZ=ON: ${CMAKE_CXX_COMPILER} cannot link with -fsanitize=fuzzer,address,undefined; "
    "install the compiler-rt runtime (Debian: apt-get install libclang-rt-14-dev).")
endif()
if(MOONWALK_SANITIZE)
  if(MSVC)
    message(FATAL_ERROR "MOONWALK_SANITIZE=ON needs GCC or clang (-fsanitize=address,undefined)")
  endif()
  string(REPLACE ";" " " _flags "${MOONWALK_SANITIZER_FLAGS}")
  _moonwalk_require_flags(sanitizers "${MOONWALK_SANITIZER_FLAGS}"
    "MOONWALK_SANITIZE=ON: ${CMAKE_CXX_COMPILER} cannot link with ${_flags} - install the sanitizer "
    "runtimes (Debian: g++ brings libasan and libubsan, clang needs apt-get install libclang-rt-14-dev).")
endif()

# moonwalk_sanitize(<target>...): ASan + UBSan, every report fatal, -O1 -g.
function(moonwalk_sanitize)
  foreach(target IN LISTS ARGN)
    target_compile_options(${target} PRIVATE ${MOONWALK_SANITIZER_FLAGS} -O1 -g)
    target_link_options(${target} PRIVATE ${MOONWALK_SANITIZER_FLAGS})
  endforeach()
endfunction()

# moonwalk_fuzzer(<target>...): a libFuzzer harness with ASan + UBSan.
function(moonwalk_fuzzer)
  foreach(target IN LISTS ARGN)
    target_compile_options(${target} PRIVATE -fsanitize=fuzzer ${MOONWALK_SANITIZER_FLAGS} -O1 -g)
    target_link_options(${target} PRIVATE -fsanitize=fuzzer ${MOONWALK_SANITIZER_FLAGS})
  endforeach()
endfunction()
