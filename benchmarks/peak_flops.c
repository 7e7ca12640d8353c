/* The machine's float32 multiply-add peak, as benchmarks/decode_step.py compares the decode step with it:
 * every OpenMP thread runs ACC independent vector multiply-adds, over and over (compiled as kernels.c is:
 * -O3 -march=native, so the same vector width). Prints GFLOPS over all threads. */
#include <omp.h>
#include <stdio.h>
#include <time.h>

#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define ACC 16 /* enough independent chains to cover the multiply-add latency of two units */
typedef float vf __attribute__((vector_size(LANES * 4)));

int main(void) {
    const long iterations = 50000000;
    struct timespec t0, t1;
    float sink = 0;
    int threads = 1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
#pragma omp parallel reduction(+ : sink)
    {
#pragma omp single
        threads = omp_get_num_threads();
        vf acc[ACC], a = {0}, b = {0};
        a += 1.0000001f;
        b += 1e-8f;
        for (int i = 0; i < ACC; i++) acc[i] = (vf){0} + (float)i;
        for (long n = 0; n < iterations; n++)
            for (int i = 0; i < ACC; i++) {
                acc[i] = acc[i] * a + b;
                __asm__("" : "+v"(acc[i])); /* kept in a register, never folded away */
            }
        for (int i = 0; i < ACC; i++) sink += acc[i][0];
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double seconds = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("%.2f %d %g\n", 2.0 * LANES * ACC * iterations * threads / seconds / 1e9, threads, sink);
    return 0;
}
