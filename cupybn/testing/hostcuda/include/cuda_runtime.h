// cuda_runtime.h: kernels written for NVRTC/nvcc may #include <cuda_runtime.h>; under hostcuda
// everything it would declare comes from hostcuda.h.
#include "hostcuda.h"
