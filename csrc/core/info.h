// Build facts of the framework-free core (no torch / pybind11 headers here).
#pragma once

namespace mirror_rt {
// Bumped when a core op's calling convention changes.
constexpr int kCoreAbiVersion = 1;
int openmp_max_threads();
}  // namespace mirror_rt
