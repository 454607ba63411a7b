// See ../README.md: Gloo's transport classes, held only behind smart pointers.
#pragma once

namespace gloo {
namespace transport {

class Device;
class UnboundBuffer;

}  // namespace transport
}  // namespace gloo
