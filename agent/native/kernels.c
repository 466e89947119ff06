/* heald's native scoring kernels: the per-sample feature window and the periodic trend fit.
 *
 * Plain C99 with no Python API: loaded with ctypes (agent/native/__init__.py) and called on
 * numpy buffers that the Python objects own and keep alive. Each function is a line-by-line
 * scalar port of the numpy reference path it replaces (agent/features/window.py and
 * agent/score/forecast.py), which stays in the tree as the fallback and as the oracle the tests
 * compare against. Nothing here allocates per sample; the trend fit allocates one scratch buffer
 * per call and returns -1 if it cannot.
 *
 * Bump HEALD_KERNELS_ABI whenever a struct layout or a signature changes: the loader refuses a
 * library whose ABI differs (a stale build) and the numpy path runs instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define HEALD_KERNELS_ABI 1

int heald_kernels_abi(void) { return HEALD_KERNELS_ABI; }

/* np.maximum: NaN when either is NaN */
static double npmax(double a, double b) { return (isnan(a) || isnan(b)) ? NAN : (a > b ? a : b); }

/* ------------------------------------------------------------------------------------------ */
/* Feature window. Layout of the running sums (rows of `sums`, each `g` long; see window.py):  */
/*   0-3: n            4: Sxx   5: Stx   6: n-1   7: Stt                                       */
/*   8: Sx   9: St   10: 0   11: St   12: Sx   13: Sx   14: 0   15: St                        */
/* and `cring` holds each of the `w` slots' contribution to them, (w, 16, g).                   */
#define FW_NS 16

typedef struct {
    int64_t g;             /* inputs */
    int64_t ntrans;        /* transforms written per input */
    int64_t window;        /* slots in the ring */
    const double *vbuf;    /* gathered raw values (their order of gathering), then one NaN */
    const int64_t *perm;   /* plan position -> vbuf index */
    const double *scale;   /* per plan position (negated for min inputs) */
    const int64_t *lo;     /* per input: its plan positions are [lo, hi) */
    const int64_t *hi;
    const int8_t *is_sum;  /* per input: 1 = finite-only sum, 0 = NaN-ignoring max */
    const double *sign;    /* per input: 1, -1 (min = -max(-x)) or NaN (no key present) */
    const int64_t *tsel;   /* ntrans transform indices: value delta rate ewma std slope */
    double *x;             /* g: the gathered inputs (written) */
    double *sums;          /* (16, g) */
    double *cring;         /* (window, 16, g) */
    double *xref;          /* g: per-input reference the sums are relative to */
    double *last;          /* g: last finite value */
    double *tlast;         /* g: its time */
    double *ewma;          /* g */
    double *out;           /* g * ntrans, input-major */
    double alpha;
    double tiny;
} fw_ctx;

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

/* One push: `pos` is the ring slot to overwrite, `t` the time relative to the window's t0. */
int heald_fw_push(const fw_ctx *c, int64_t pos, double t, double mono) {
    const int64_t g = c->g;
    if (pos < 0 || pos >= c->window) return -1;
    fw_gather(c);
    double *slot = c->cring + pos * FW_NS * g;
    double *s = c->sums;
    for (int64_t i = 0; i < g; i++) {
        const double xi = c->x[i];
        const int fin = isfinite(xi);
        const double vf = fin ? 1.0 : 0.0;
        const double v = fin ? xi - c->xref[i] : 0.0;
        double k[FW_NS];
        k[0] = k[1] = k[2] = k[3] = vf;
        k[4] = v * v;
        k[5] = t * v;
        k[6] = vf;
        k[7] = (t * t) * vf;
        k[8] = v;
        k[9] = t * vf;
        k[10] = 0.0;
        k[11] = t * vf;
        k[12] = v;
        k[13] = v;
        k[14] = 0.0;
        k[15] = t * vf;
        for (int r = 0; r < FW_NS; r++) {
            double *sr = s + r * g + i;
            double *cr = slot + r * g + i;
            *sr = *sr - *cr;
            *cr = k[r];
            *sr = *sr + k[r];
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
        const double *S = s + i;
        const double num_var = S[0 * g] * S[4 * g] - S[8 * g] * S[12 * g];
        const double num_slope = S[1 * g] * S[5 * g] - S[9 * g] * S[13 * g];
        double den_var = S[2 * g] * S[6 * g] - S[10 * g] * S[14 * g];
        double den_slope = S[3 * g] * S[7 * g] - S[11 * g] * S[15 * g];
        den_var = npmax(den_var, c->tiny);
        den_slope = npmax(den_slope, c->tiny);
        if (S[0 * g] < 1.5) den_var = NAN; /* fewer than 2 valid values: no std, no slope */
        if (S[1 * g] < 1.5) den_slope = NAN;
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

/* ------------------------------------------------------------------------------------------ */
/* Trend fit (forecast.py: Forecaster._fit and robust_trend).                                   */

/* The k-th smallest of a[0..n) (0-based), partially reordering a: a[k] holds it and every
 * entry after k is >= it. No NaN allowed. */
static double kth_smallest(double *a, int64_t n, int64_t k) {
    int64_t l = 0, r = n - 1;
    while (l < r) {
        const double pivot = a[l + (r - l) / 2];
        int64_t i = l, j = r;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                const double tmp = a[i];
                a[i] = a[j];
                a[j] = tmp;
                i++;
                j--;
            }
        }
        if (k <= j) r = j;
        else if (k >= i) l = i;
        else break;
    }
    return a[k];
}

/* Median of the finite entries of v[0..n) (copied into scratch); NaN when there is none.
 * Stores the number of finite entries in *count. */
static double nanmedian(const double *v, int64_t n, double *scratch, int64_t *count) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
        if (isfinite(v[i])) scratch[m++] = v[i];
    *count = m;
    if (m == 0) return NAN;
    const int64_t lo = (m - 1) / 2, hi = m / 2;
    const double a = kth_smallest(scratch, m, lo);
    double b = a;
    if (hi != lo) {
        b = scratch[lo + 1];
        for (int64_t i = lo + 2; i < m; i++)
            if (scratch[i] < b) b = scratch[i];
    }
    return 0.5 * (a + b);
}

static double sgn(double v) { return v > 0.0 ? 1.0 : (v < 0.0 ? -1.0 : (v == 0.0 ? 0.0 : NAN)); }

/* Fit every (window w, resource r) row. ring: (cap + 1, k) values, tring: (cap + 1) times,
 * idx: (nw, m) ring rows per window (padding rows read NaN). Writes eta, confidence and rate
 * (nw, k) for the rows with a usable forecast only; the caller prefills NaN, 0, 0.
 * Returns 0, or -1 when scratch memory cannot be had. */
int heald_trend_fit(const double *ring, const double *tring, const int64_t *idx, int64_t nw,
                    int64_t m, int64_t k, const double *sign, const double *limit,
                    double min_points, double max_eta, double *out_eta, double *out_conf,
                    double *out_rate) {
    if (m <= 0 || k <= 0 || nw <= 0) return 0;
    const int64_t npairs = m * (m - 1) / 2;
    double *buf = malloc(sizeof(double) * (size_t)(4 * m + 2 * npairs + 1));
    if (buf == NULL) return -1;
    double *t = buf, *y = buf + m, *resid = buf + 2 * m, *dev = buf + 3 * m;
    double *sl = buf + 4 * m, *scratch = buf + 4 * m + npairs;
    for (int64_t w = 0; w < nw; w++) {
        const int64_t *row = idx + w * m;
        for (int64_t j = 0; j < m; j++) t[j] = tring[row[j]];
        const double tend = t[m - 1];
        for (int64_t r = 0; r < k; r++) {
            for (int64_t j = 0; j < m; j++) y[j] = ring[row[j] * k + r];
            /* least-squares pre-filter */
            double cnt = 0.0, st = 0.0, sy = 0.0;
            for (int64_t j = 0; j < m; j++)
                if (isfinite(y[j])) {
                    cnt += 1.0;
                    st += t[j] - tend;
                    sy += y[j];
                }
            if (!(cnt >= min_points)) continue;
            const double tm = st / cnt, ym = sy / cnt;
            double stt = 0.0, sty = 0.0, syy = 0.0;
            for (int64_t j = 0; j < m; j++)
                if (isfinite(y[j])) {
                    const double tc = (t[j] - tend) - tm, yc = y[j] - ym;
                    stt += tc * tc;
                    sty += tc * yc;
                    syy += yc * yc;
                }
            const double ols = sty / stt;
            const double rvar = npmax(syy - ols * sty, 0.0) / npmax(cnt - 2.0, 1.0);
            const double change2 = ols * ols * 12.0 * stt / cnt;
            const double level_ls = ym - ols * tm;
            const double toward = -ols * sign[r];
            const double room = (level_ls - limit[r]) * sign[r];
            if (!(toward > 0.0 && change2 >= rvar && (room < max_eta * toward || room <= 0.0))) continue;
            /* Theil-Sen: the median of all pairwise slopes */
            int64_t p = 0;
            for (int64_t i = 0; i < m; i++)
                for (int64_t j = i + 1; j < m; j++) {
                    const double dt = t[j] - t[i];
                    sl[p++] = (y[j] - y[i]) / (dt > 0.0 ? dt : NAN);
                }
            int64_t nv = 0, unused = 0;
            double slope = nanmedian(sl, npairs, scratch, &nv);
            const int ok = nv >= 3;
            if (!ok) slope = NAN;
            for (int64_t j = 0; j < m; j++) resid[j] = y[j] - slope * (t[j] - tend);
            const double level = nanmedian(resid, m, scratch, &unused);
            for (int64_t j = 0; j < m; j++) dev[j] = fabs(resid[j] - level);
            const double mad = nanmedian(dev, m, scratch, &unused);
            int64_t first = 0, last = m - 1;
            while (first < m && !isfinite(y[first])) first++;
            while (last > 0 && !isfinite(y[last])) last--;
            if (first == m) first = 0;
            const double span = t[last] - t[first];
            const double scale = npmax(1.4826 * mad, 1e-9 * npmax(fabs(level), 1.0));
            const double signal = 1.0 - exp(-fabs(slope) * span / (3.0 * scale));
            const double ss = sgn(slope);
            int64_t same = 0;
            for (int64_t q = 0; q < npairs; q++)
                if (sgn(sl[q]) == ss) same++;
            double c = 2.0 * ((double)same / (double)(nv > 1 ? nv : 1)) - 1.0;
            if (c < 0.0) c = 0.0;
            if (c > 1.0) c = 1.0;
            double conf = c * signal;
            if (!(ok && slope != 0.0 && isfinite(conf))) conf = 0.0;
            conf *= (cnt / min_points < 1.0 ? cnt / min_points : 1.0);
            const double tw = -slope * sign[r];
            const double rm = (level - limit[r]) * sign[r];
            const double eta = rm <= 0.0 ? 0.0 : rm / (tw > 0.0 ? tw : NAN);
            if (isfinite(eta) && eta <= max_eta) {
                out_eta[w * k + r] = eta;
                out_conf[w * k + r] = conf;
                out_rate[w * k + r] = slope;
            }
        }
    }
    free(buf);
    return 0;
}
