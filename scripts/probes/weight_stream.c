// Read bandwidth of a batch-1 f32 matrix-vector product (k = 1024, 400 MB of weights,
// one thread) in three access orders, with and without transparent huge pages. It is
// the measurement behind the kernels' STREAM_TOKENS (model/src/linalg/simd.rs).
//
//   gcc -O2 -mavx2 -mfma -o /tmp/weight_stream scripts/probes/weight_stream.c
//   /tmp/weight_stream        # 4 KiB pages
//   /tmp/weight_stream hp     # madvise(MADV_HUGEPAGE) on the weights
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define K 1024

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float hsum(__m256 a) {
  float b[8], s = 0;
  _mm256_storeu_ps(b, a);
  for (int i = 0; i < 8; i++) s += b[i];
  return s;
}

// 4 rows interleaved, one accumulator each; `pf` > 0 prefetches that many floats ahead.
static void rows4(const float *w, const float *x, float *o, size_t n, int pf) {
  for (size_t r = 0; r + 4 <= n; r += 4) {
    const float *w0 = w + r * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < K; i += 8) {
      if (pf && (i & 15) == 0) {
        _mm_prefetch((const char *)(w0 + i + pf), _MM_HINT_T0);
        _mm_prefetch((const char *)(w1 + i + pf), _MM_HINT_T0);
        _mm_prefetch((const char *)(w2 + i + pf), _MM_HINT_T0);
        _mm_prefetch((const char *)(w3 + i + pf), _MM_HINT_T0);
      }
      __m256 v = _mm256_loadu_ps(x + i);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), v, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), v, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), v, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), v, a3);
    }
    o[r] = hsum(a0), o[r + 1] = hsum(a1), o[r + 2] = hsum(a2), o[r + 3] = hsum(a3);
  }
}

// One row at a time, one accumulator (the kernels' order: same bits as the tiles).
static void rows1(const float *w, const float *x, float *o, size_t n) {
  for (size_t r = 0; r < n; r++) {
    const float *w0 = w + r * K;
    __m256 a = _mm256_setzero_ps();
    for (int i = 0; i < K; i += 8)
      a = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), _mm256_loadu_ps(x + i), a);
    o[r] = hsum(a);
  }
}

int main(int argc, char **argv) {
  size_t bytes = (size_t)400 << 20, n = bytes / 4 / K;
  int huge = argc > 1 && strcmp(argv[1], "hp") == 0;
  float *w = aligned_alloc((size_t)2 << 20, bytes), *o = malloc(n * 4), x[K];
  if (!w || !o) return 1;
  if (huge && madvise(w, bytes, MADV_HUGEPAGE) != 0) perror("madvise");
  memset(w, 0, bytes);
  for (size_t i = 0; i < n * K; i += 997) w[i] = 1;
  for (int i = 0; i < K; i++) x[i] = (float)i;
  const char *names[] = {"4 rows interleaved", "4 rows, prefetch 1 KiB ahead",
                         "one row at a time"};
  for (int rep = 0; rep < 3; rep++) {
    for (int m = 0; m < 3; m++) {
      double t = now();
      for (int it = 0; it < 5; it++) {
        if (m == 0) rows4(w, x, o, n, 0);
        if (m == 1) rows4(w, x, o, n, 256);
        if (m == 2) rows1(w, x, o, n);
      }
      t = now() - t;
      printf("%-30s %5.1f GB/s (check %g)\n", names[m], 5 * bytes / t / 1e9, o[3]);
    }
  }
  return 0;
}
