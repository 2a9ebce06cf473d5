/* One token from softmax(logits * k + bias * k), or the argmax when k is 0: Parley's per-token draw
 * for plain temperature and greedy requests (fastdraw.py builds and loads this file).
 *
 * Exact like the numpy version it replaces: exp of every logit (vectorized through glibc's
 * libmvec), a sum per block of 256 in float lanes added in double, then a walk over the block
 * sums and inside the chosen block only. Nothing is written but `sums`; the bias is added to the
 * logits in place and taken off again (the originals are kept in `saved`). Called through ctypes,
 * which releases the GIL for the call.
 */
#include <math.h>
#include <stdint.h>

#if defined(__GLIBC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((simd("notinbranch"))) extern float expf(float); /* libmvec has the vector versions */
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define LANES 16
#define BLOCK 256

CLONES static float peak_of(const float *restrict x, int64_t n) {
    float m[LANES];
    for (int l = 0; l < LANES; l++) m[l] = -INFINITY;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
    float p = -INFINITY;
    for (int l = 0; l < LANES; l++) p = m[l] > p ? m[l] : p;
    for (; i < n; i++) p = x[i] > p ? x[i] : p;
    return p;
}

CLONES static double block_sum(const float *restrict x, int64_t s, int64_t e, float k, float shift) {
    float acc[LANES] = {0};
    int64_t i = s;
    for (; i + LANES <= e; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += expf(x[i + l] * k - shift);
    double t = 0.0;
    for (; i < e; i++) t += expf(x[i] * k - shift);
    for (int l = 0; l < LANES; l++) t += acc[l];
    return t;
}

static int64_t draw(const float *restrict x, int64_t n, float k, double *restrict sums, double u) {
    float peak = peak_of(x, n);
    if (!isfinite(peak)) return -1; /* everything masked (or a NaN row) */
    if (k == 0.0f) {
        for (int64_t i = 0; i < n; i++)
            if (x[i] == peak) return i;
    }
    float shift = peak * k;
    int64_t nb = (n + BLOCK - 1) / BLOCK;
    double total = 0.0;
    for (int64_t b = 0; b < nb; b++) {
        int64_t s = b * BLOCK, e = s + BLOCK < n ? s + BLOCK : n;
        sums[b] = block_sum(x, s, e, k, shift);
        total += sums[b];
    }
    double target = u * total, acc = 0.0;
    int64_t b = 0;
    for (; b < nb - 1 && acc + sums[b] <= target; b++) acc += sums[b];
    int64_t s = b * BLOCK, e = s + BLOCK < n ? s + BLOCK : n, last = -1;
    for (int64_t i = s; i < e; i++) {
        float w = expf(x[i] * k - shift);
        if (w > 0.0f) {
            acc += w;
            last = i;
            if (acc > target) return i;
        }
    }
    if (last >= 0) return last; /* rounding ran past the block's end: its last token with weight */
    for (int64_t i = s - 1; i >= 0; i--) /* the block had none: the nearest token before it */
        if (expf(x[i] * k - shift) > 0.0f) return i;
    return -1;
}

/* `sums` holds (n + 255) / 256 doubles; `saved` n_bias floats. Returns the token, or -1 when none has weight. */
int64_t parley_draw(float *restrict x, int64_t n, float k, const int32_t *restrict bias_ids,
                    const float *restrict bias_vals, float *restrict saved, int64_t n_bias,
                    double *restrict sums, double u) {
    for (int64_t j = 0; j < n_bias; j++) {
        saved[j] = x[bias_ids[j]];
        x[bias_ids[j]] += bias_vals[j];
    }
    int64_t token = draw(x, n, k, sums, u);
    for (int64_t j = n_bias - 1; j >= 0; j--) x[bias_ids[j]] = saved[j];
    return token;
}
