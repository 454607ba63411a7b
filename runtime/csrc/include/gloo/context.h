// See README.md: the part of gloo::Context that ProcessGroupGloo.hpp names.
#pragma once

#include <chrono>

namespace gloo {

class Context {
 public:
  // Named by the inline ProcessGroupGloo::setTimeout (defined in Gloo, inside libtorch_cpu).
  void setTimeout(std::chrono::milliseconds timeout);
};

}  // namespace gloo
