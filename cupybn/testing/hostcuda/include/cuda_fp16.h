// cuda_fp16.h: kernels written for NVRTC/nvcc may #include <cuda_fp16.h>; under hostcuda
// everything it would declare comes from hostcuda.h.
#include "hostcuda.h"
