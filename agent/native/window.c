/* heald's native kernels: the feature window (agent/features/window.py: FeatureWindow). */
#include "kernels.h"

/* The numpy path keeps every slot's contribution to 16 sum rows;
 * here the ring keeps only each slot's value relative to its input's reference (NaN = no
 * valid value) and the slot times, and the contributions are recomputed from them bit for bit
 * when a slot is evicted: 8x less memory touched per sample. Sums, (6, g):                    */
enum { S_N, S_T, S_TT, S_X, S_XX, S_TX, FW_NSUM };

/* A slot's contribution to the six sums, from its relative value v (NaN = none) and time t. */
static void fw_contrib(double v, double t, double k[FW_NSUM]) {
    const int valid = isfinite(v) && isfinite(t);
    const double vf = valid ? 1.0 : 0.0;
    const double vv = valid ? v : 0.0;
    const double tz = isfinite(t) ? t : 0.0;
    k[S_N] = vf;
    k[S_T] = tz * vf;
    k[S_TT] = (tz * tz) * vf;
    k[S_X] = vv;
    k[S_XX] = vv * vv;
    k[S_TX] = tz * vv;
}

/* Reduce the gathered values into ctx->x (wildcards: max/min/sum over their labels). */
static void fw_gather(const fw_ctx *c) {
    for (int64_t i = 0; i < c->g; i++) {
        double acc = NAN;
        if (c->is_sum[i]) {
            int any = 0;
            acc = 0.0;
            for (int64_t j = c->lo[i]; j < c->hi[i]; j++) {
                double v = c->vbuf[c->perm[j]] * c->scale[j];
                if (isfinite(v)) {
                    acc += v;
                    any = 1;
                }
            }
            if (!any) acc = NAN;
        } else {
            for (int64_t j = c->lo[i]; j < c->hi[i]; j++) {
                double v = c->vbuf[c->perm[j]] * c->scale[j];
                if (!isnan(v) && (isnan(acc) || v > acc)) acc = v;
            }
        }
        c->x[i] = acc * c->sign[i];
    }
}

/* Despike (window.py: FeatureWindow._despike): the gathered value goes into row `dpos` of the
 * ring of the last `despike` values; where all of them are finite the input becomes their
 * median (+ 0.0, so that a median of signed zeros is +0 whichever zero the sort picked). */
static void fw_despike(const fw_ctx *c, int64_t dpos) {
    const int64_t g = c->g, k = c->despike;
    for (int64_t i = 0; i < g; i++) {
        c->dring[dpos * g + i] = c->x[i];
        double v[9];
        int ok = 1;
        for (int64_t r = 0; r < k; r++) {
            const double a = c->dring[r * g + i];
            if (!isfinite(a)) {
                ok = 0;
                break;
            }
            int64_t j = r; /* insertion sort */
            while (j > 0 && v[j - 1] > a) {
                v[j] = v[j - 1];
                j--;
            }
            v[j] = a;
        }
        if (ok) c->x[i] = v[k / 2] + 0.0;
    }
}

/* One push into slot `pos`; `t` is the time relative to the window's t0; `dpos` the despike
 * ring's row for this push. */
int heald_fw_push(const fw_ctx *c, int64_t pos, double t, double mono, int64_t dpos) {
    const int64_t g = c->g;
    if (pos < 0 || pos >= c->window) return -1;
    if (c->despike < 1 || c->despike > 9 || c->despike % 2 == 0) return -2;
    if (c->despike > 1 && (dpos < 0 || dpos >= c->despike)) return -3;
    fw_gather(c);
    if (c->despike > 1) fw_despike(c, dpos);
    double *slot = c->ring + pos * g;
    double *s = c->sums;
    const double told = c->tring[pos];
    c->tring[pos] = t;
    for (int64_t i = 0; i < g; i++) {
        const double xi = c->x[i];
        const int fin = isfinite(xi);
        double kold[FW_NSUM], knew[FW_NSUM];
        fw_contrib(slot[i], told, kold);
        const double v = fin ? xi - c->xref[i] : NAN;
        fw_contrib(v, t, knew);
        slot[i] = v;
        for (int r = 0; r < FW_NSUM; r++) {
            double *sr = s + r * g + i;
            *sr = (*sr - kold[r]) + knew[r];
        }
        /* value, delta, rate, ewma */
        double f[6];
        f[0] = xi;
        f[1] = xi - c->last[i];
        f[2] = f[1] / (mono - c->tlast[i]);
        double e = c->ewma[i];
        if (isnan(e)) e = xi; /* the first value of an input starts its EWMA */
        const double upd = e + (xi - e) * c->alpha;
        if (fin) e = upd;
        c->ewma[i] = e;
        f[3] = e;
        /* std and slope: [n Sxx - Sx Sx, n Stx - St Sx] / [n (n-1), n Stt - St St] */
        const double n = s[S_N * g + i], st = s[S_T * g + i], sx = s[S_X * g + i];
        const double num_var = n * s[S_XX * g + i] - sx * sx;
        const double num_slope = n * s[S_TX * g + i] - st * sx;
        double den_var = n * (n - 1.0) - 0.0 * 0.0;
        double den_slope = n * s[S_TT * g + i] - st * st;
        den_var = npmax(den_var, c->tiny);
        den_slope = npmax(den_slope, c->tiny);
        if (n < 1.5) den_var = den_slope = NAN; /* fewer than 2 valid values: no std, no slope */
        f[4] = sqrt(npmax(num_var / den_var, 0.0));
        f[5] = num_slope / den_slope;
        if (fin) {
            c->last[i] = xi;
            c->tlast[i] = mono;
        }
        double *o = c->out + i * c->ntrans;
        for (int64_t j = 0; j < c->ntrans; j++) o[j] = f[c->tsel[j]];
    }
    return 0;
}

/* Rebase (window.py: FeatureWindow._rebase): re-express every slot relative to the new time
 * origin `t` (old origin `t0`) and to fresh per-input references (each input's last finite
 * value), and recompute the sums exactly from the ring. */
int heald_fw_rebase(const fw_ctx *c, double t0, double t) {
    const int64_t g = c->g, w = c->window;
    for (int64_t q = 0; q < w; q++) c->tring[q] = (c->tring[q] + t0) - t;
    for (int64_t i = 0; i < g; i++) {
        const double old = c->xref[i];
        const double ref = isfinite(c->last[i]) ? c->last[i] : 0.0;
        double acc[FW_NSUM] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        for (int64_t q = 0; q < w; q++) {
            double *v = c->ring + q * g + i;
            const double xr = (*v + old) - ref; /* NaN stays NaN */
            const double keep = isfinite(xr) && isfinite(c->tring[q]) ? xr : NAN;
            *v = keep;
            double k[FW_NSUM];
            fw_contrib(keep, c->tring[q], k);
            for (int r = 0; r < FW_NSUM; r++) acc[r] = q == 0 ? k[r] : acc[r] + k[r];
        }
        for (int r = 0; r < FW_NSUM; r++) c->sums[r * g + i] = acc[r];
        c->xref[i] = ref;
    }
    return 0;
}
