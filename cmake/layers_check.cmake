# ctest (label unit): each layer's include path (build/layers/<layer>, CMakeLists.txt) compiles
# a probe that includes its own headers and the layers' below, and fails on any higher layer's
# header with "No such file": what keeps framework/ from including jobs/ or analysis/.
# The preprocessor runs (as C++20, which a PyPI LibTorch's headers require) on the probe alone with the include directories the layer's sources
# get, its linked libraries' included, written to a response file at generate time.
set(probes ${PROJECT_BINARY_DIR}/layers/probes)
# A header of each layer that needs little else to compile (jobs/version.h is generated).
set(allowed_parallel parallel/errors.h)
set(allowed_framework framework/json_fields.h)
set(allowed_analysis analysis/pooling.h framework/json_fields.h)
set(allowed_jobs jobs/version.h analysis/pooling.h)
set(denied_framework framework/json_fields.h)
set(denied_analysis analysis/cka.h)
set(denied_jobs jobs/job.h)

set(above ${CRASH_LAYERS})
foreach(layer ${CRASH_LAYERS})
  list(REMOVE_AT above 0)
  file(GENERATE OUTPUT ${probes}/${layer}.rsp
       CONTENT "-I$<JOIN:$<TARGET_PROPERTY:${layer},INCLUDE_DIRECTORIES>,\n-I>\n")
  set(compile ${CMAKE_COMMAND} -E env LC_ALL=C ${CMAKE_CXX_COMPILER} -std=c++20 -E -o /dev/null @${probes}/${layer}.rsp)

  set(source "")
  foreach(header ${allowed_${layer}})
    string(APPEND source "#include \"${header}\"\n")
  endforeach()
  file(WRITE ${probes}/${layer}_sees.cpp "${source}")
  add_test(NAME layers.${layer}_sees_its_own COMMAND ${compile} ${probes}/${layer}_sees.cpp)
  set_tests_properties(layers.${layer}_sees_its_own PROPERTIES LABELS unit)

  foreach(higher ${above})
    set(header ${denied_${higher}})
    file(WRITE ${probes}/${layer}_not_${higher}.cpp "#include \"${header}\"\n")
    add_test(NAME layers.${layer}_not_${higher} COMMAND ${compile} ${probes}/${layer}_not_${higher}.cpp)
    string(REPLACE "." "\\." pattern "${header}: No such file or directory")
    set_tests_properties(layers.${layer}_not_${higher} PROPERTIES LABELS unit PASS_REGULAR_EXPRESSION "${pattern}")
  endforeach()
endforeach()
