// Errors a user can cause (bad file, field, option or grid): reported as one line, exit code 2.
#pragma once
#include <fmt/format.h>
#include <stdexcept>
#include <string>

namespace crash {

struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw UserError(fmt::format(format, std::forward<Args>(args)...));
}

constexpr int kExitUserError = 2;

}  // namespace crash
