/* gemm_check.c — see gemm_check.h. */
#include "gemm_check.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "harness.h"

int gemm_within_bound(const float *y, const float *x, float (*xmap)(float), const float *wx,
                      const float *b, int rows, int n, int k, double chain, const char *what) {
    const double u = ldexp(1.0, -24);
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < n; r++) {
            double ref = b ? b[r] : 0.0, mag = b ? fabs(b[r]) : 0.0;
            for (int j = 0; j < k; j++) {
                const float xv = x[(int64_t)i * k + j];
                const double t = (double)(xmap ? xmap(xv) : xv) * wx[(int64_t)r * k + j];
                ref += t;
                mag += fabs(t);
            }
            if (fabs(y[(int64_t)i * n + r] - ref) > chain * u * mag) {
                test_fail(__FILE__, __LINE__, "%s: y[%d,%d] %.9g vs %.9g (bound %.3g)", what, i, r,
                          y[(int64_t)i * n + r], ref, chain * u * mag);
                return 0;
            }
        }
    return 1;
}

int gemm_rows_match(const float *y, const float *single, int first, int m, int n, const char *what) {
    for (int i = 0; i < m; i++)
        if (memcmp(y + (int64_t)i * n, single + (int64_t)(first + i) * n, sizeof(float) * (size_t)n)) {
            test_fail(__FILE__, __LINE__, "%s: row %d of m = %d differs from its per-row result", what,
                      first + i, m);
            return 0;
        }
    return 1;
}
