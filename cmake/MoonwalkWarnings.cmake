# moonwalk_warnings(<target>...)
#
# Strict warnings for Moonwalk's own targets (tests, examples, benchmarks,
# header checks). Never applied to the INTERFACE target `moonwalk`, so
# consumers keep their own warning flags. Third-party headers (Eigen, Catch2,
# Google Benchmark) come in through imported targets, i.e. as SYSTEM includes,
# and are not affected.
include_guard(GLOBAL)

function(moonwalk_warnings)
  foreach(target IN LISTS ARGN)
    get_target_property(_type ${target} TYPE)
    if(_type STREQUAL "INTERFACE_LIBRARY")
      message(FATAL_ERROR "moonwalk_warnings(${target}): not for INTERFACE targets")
    endif()
    if(MSVC)
      target_compile_options(${target} PRIVATE /W4 /permissive-)
      if(MOONWALK_WARNINGS_AS_ERRORS)
        target_compile_options(${target} PRIVATE /WX)
      endif()
    else()
      target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
      if(MOONWALK_WARNINGS_AS_ERRORS)
        target_compile_options(${target} PRIVATE -Werror)
      endif()
    endif()
  endforeach()
endfunction()
