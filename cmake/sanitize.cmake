# CRASH_SANITIZE=ON: AddressSanitizer and UndefinedBehaviorSanitizer on every target, at -O1
# with line tables only (-g1: reports name file and line, and the LibTorch-heavy objects build
# in far less time than with full debug info). A separate build folder, build-asan; env/test.sh
# builds unit_tests and crash-hpc there and runs the `unit` label.
option(CRASH_SANITIZE "Build with -fsanitize=address,undefined" OFF)
if(CRASH_SANITIZE)
  set(crash_sanitize_flags -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
  set(CMAKE_CXX_FLAGS_DEBUG "-g1")
  set(CMAKE_C_FLAGS_DEBUG "-g1")
  add_compile_options(${crash_sanitize_flags} -O1)
  add_link_options(${crash_sanitize_flags})
  message(STATUS "crash-hpc: built with ${crash_sanitize_flags}")
endif()
