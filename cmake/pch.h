// Heavy headers compiled once for every target.
#pragma once
#include <fmt/format.h>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <spdlog/spdlog.h>
#include <string>
#include <torch/torch.h>
#include <vector>
