# CRASH_SANITIZE=ON: AddressSanitizer and UndefinedBehaviorSanitizer on every target, at -O1
# with debug info (a separate build folder, build-asan; env/test.sh builds unit_tests and
# crash-hpc there and runs the `unit` label).
option(CRASH_SANITIZE "Build with -fsanitize=address,undefined" OFF)
if(CRASH_SANITIZE)
  set(crash_sanitize_flags -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
  add_compile_options(${crash_sanitize_flags} -O1 -g)
  add_link_options(${crash_sanitize_flags})
  message(STATUS "crash-hpc: built with ${crash_sanitize_flags}")
endif()
