#include "core/info.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace mirror_rt {
int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
}  // namespace mirror_rt
