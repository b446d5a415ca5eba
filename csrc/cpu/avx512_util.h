// AVX-512 helpers shared by attention_avx512.cpp and linear_avx512.cpp. Include after the file's
// `#pragma GCC target(...)`: the functions need AVX-512F. `static`: each translation unit keeps its own copy.
#pragma once

#include <immintrin.h>

// v[0..15] -> one vector whose lane t is the sum of v[t]'s 16 lanes (45 shuffles/adds for 16 dot products).
static inline __m512 hsum16(const __m512* v) {
  __m512 w[8];
  for (int i = 0; i < 8; ++i)  // 128-bit lane L: [a(0+2), b(0+2), a(1+3), b(1+3)] of (a, b) = (v[2i], v[2i+1])
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 x[4];
  for (int j = 0; j < 4; ++j) {  // 128-bit lane L of x[j]: lane-L sums of v[4j .. 4j+3]
    const __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
    x[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Sum the four 128-bit lanes; 128-bit lane j of the result holds v[4j .. 4j+3].
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

