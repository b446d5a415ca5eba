// The CPU kernels compiled for one instruction set; dispatch.cpp picks one at run time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// Baseline x86-64 (SSE2): no target pragma.
#define LLMKERN_ISA generic
#include "kernels_impl.h"
