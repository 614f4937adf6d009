#pragma once
#include <cassert>
#define CUDA_KERNEL_ASSERT(cond) assert(cond)
