// The CPU kernels compiled for one instruction set; dispatch.cpp picks one at run time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)  // elsewhere: portable code under this namespace, never dispatched to
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")
#endif
#define LLMKERN_ISA avx512
#define LLMKERN_HAS_FMA 1
#include "kernels_impl.h"
