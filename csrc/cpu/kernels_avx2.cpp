// The CPU kernels compiled for one instruction set; dispatch.cpp picks one at run time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)  // elsewhere: portable code under this namespace, never dispatched to
#pragma GCC target("avx2,f16c,fma")
#endif
#define LLMKERN_ISA avx2
#define LLMKERN_HAS_FMA 1
#include "kernels_impl.h"
