# cmake -P script behind the CTest tests consumer.find_package and
# consumer.add_subdirectory. Inputs (-D):
#   MODE                 find_package | add_subdirectory
#   MOONWALK_SOURCE_DIR  the Moonwalk source tree
#   MOONWALK_BINARY_DIR  its (configured, built) build tree
#   CONFIG               build configuration (e.g. Release)
#   GENERATOR, GENERATOR_PLATFORM, GENERATOR_TOOLSET, CXX_COMPILER  as in the parent build
#
# find_package:     cmake --install <build> --prefix <build>/consumer-prefix, then
#                   configure tests/consumer into <build>/consumer-build with
#                   CMAKE_PREFIX_PATH=<prefix>, build it and run it.
# add_subdirectory: configure tests/consumer/subdir into <build>/consumer-subdir-build
#                   (it add_subdirectory()s the source tree), build it and run it.
# Any failing step is a FATAL_ERROR.
cmake_minimum_required(VERSION 3.25)

foreach(_var IN ITEMS MODE MOONWALK_SOURCE_DIR MOONWALK_BINARY_DIR GENERATOR)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${_var}=... is required")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Release)
endif()

function(run_step what)
  string(REPLACE ";" " " _pretty "${ARGN}")
  message(STATUS "[consumer.${MODE}] ${what}: ${_pretty}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc)
  if(NOT _rc STREQUAL "0")
    message(FATAL_ERROR "[consumer.${MODE}] ${what} failed (${_rc}): ${_pretty}")
  endif()
endfunction()

set(_configure_args -G "${GENERATOR}" "-DCMAKE_BUILD_TYPE=${CONFIG}")
if(GENERATOR_PLATFORM)
  list(APPEND _configure_args -A "${GENERATOR_PLATFORM}")
endif()
if(GENERATOR_TOOLSET)
  list(APPEND _configure_args -T "${GENERATOR_TOOLSET}")
endif()
if(CXX_COMPILER)
  list(APPEND _configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()

if(MODE STREQUAL "find_package")
  set(_prefix "${MOONWALK_BINARY_DIR}/consumer-prefix")
  set(_build "${MOONWALK_BINARY_DIR}/consumer-build")
  file(REMOVE_RECURSE "${_prefix}" "${_build}")
  run_step("install" "${CMAKE_COMMAND}" --install "${MOONWALK_BINARY_DIR}" --prefix "${_prefix}"
           --config "${CONFIG}" --component moonwalk_Development)
  run_step("configure" "${CMAKE_COMMAND}" -S "${MOONWALK_SOURCE_DIR}/tests/consumer" -B "${_build}"
           ${_configure_args} "-DCMAKE_PREFIX_PATH=${_prefix}"
           -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
  # The package must come from the fresh prefix, not from anything else on the machine.
  file(STRINGS "${_build}/CMakeCache.txt" _dir REGEX "^moonwalk_DIR:")
  string(REGEX REPLACE "^moonwalk_DIR:[A-Z]+=" "" _dir "${_dir}")
  file(REAL_PATH "${_dir}" _dir)
  file(REAL_PATH "${_prefix}" _real_prefix)
  string(FIND "${_dir}" "${_real_prefix}/" _at)
  if(NOT _at EQUAL 0)
    message(FATAL_ERROR "[consumer.${MODE}] moonwalk was found in '${_dir}', not under '${_real_prefix}'")
  endif()
elseif(MODE STREQUAL "add_subdirectory")
  set(_build "${MOONWALK_BINARY_DIR}/consumer-subdir-build")
  file(REMOVE_RECURSE "${_build}")
  run_step("configure" "${CMAKE_COMMAND}" -S "${MOONWALK_SOURCE_DIR}/tests/consumer/subdir" -B "${_build}"
           ${_configure_args} "-DMOONWALK_SOURCE_DIR=${MOONWALK_SOURCE_DIR}")
else()
  message(FATAL_ERROR "run_consumer.cmake: unknown MODE '${MODE}' (find_package | add_subdirectory)")
endif()

run_step("build" "${CMAKE_COMMAND}" --build "${_build}" --config "${CONFIG}")
run_step("run" "${_build}/bin/consumer")
message(STATUS "[consumer.${MODE}] OK")
