/* heald's native scoring kernels: every per-sample step of the score stage.
 *
 * Plain C99 with no Python API: loaded with ctypes (agent/native/__init__.py) and called on
 * numpy buffers that the Python objects own and keep alive. Each function is a line-by-line
 * scalar port of the numpy reference path it replaces (agent/features/window.py,
 * agent/score/forecast.py, detector.py, classifier.py), which stays in the tree as the fallback
 * and as the oracle tests/test_native_kernels.py compares against. Nothing here allocates per
 * sample; the trend refit (every 10 samples) allocates its scratch per call and returns -1 if
 * it cannot. Index arrays are validated by the Python side when they are bound.
 *
 * Bump HEALD_KERNELS_ABI whenever a struct layout or a signature changes: the loader refuses a
 * library whose ABI differs (a stale build) and the numpy path runs instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define HEALD_KERNELS_ABI 6

int heald_kernels_abi(void) { return HEALD_KERNELS_ABI; }

/* np.maximum: NaN when either is NaN */
static double npmax(double a, double b) { return (isnan(a) || isnan(b)) ? NAN : (a > b ? a : b); }

/* ------------------------------------------------------------------------------------------ */
/* Feature window (window.py). The numpy path keeps every slot's contribution to 16 sum rows;
 * here the ring keeps only each slot's value relative to its input's reference (NaN = no
 * valid value) and the slot times, and the contributions are recomputed from them bit for bit
 * when a slot is evicted: 8x less memory touched per sample. Sums, (6, g):                    */
enum { S_N, S_T, S_TT, S_X, S_XX, S_TX, FW_NSUM };

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
    double *sums;          /* (6, g) running sums over the window's valid entries */
    double *ring;          /* (window, g): value - reference, NaN where not valid */
    double *tring;         /* window: slot time relative to the window's t0, NaN = unused */
    double *xref;          /* g: per-input reference the values are relative to */
    double *last;          /* g: last finite value */
    double *tlast;         /* g: its time */
    double *ewma;          /* g */
    double *out;           /* g * ntrans, input-major */
    double alpha;
    double tiny;
    int64_t despike;       /* median of this many last values (odd; 1 = off) */
    double *dring;         /* (despike, g): the last gathered values, raw */
} fw_ctx;

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

/* Fit one resource's series y over times t (m points, NaN = missing; t[m-1] is the latest):
 * least-squares pre-filter, then Theil-Sen, confidence and ETA. Returns 1 and sets *eta,
 * *conf, *rate when the forecast is usable, else 0. sl (m (m-1) / 2), resid, dev, scratch
 * (>= the pair count) are scratch space. */
static int fit_row(const double *t, const double *y, int64_t m, double sign, double limit,
                   double min_points, double max_eta, double *sl, double *resid, double *dev,
                   double *scratch, double *eta_out, double *conf_out, double *rate_out) {
    const double tend = t[m - 1];
    /* least-squares pre-filter: moving towards the limit, plausibly within max_eta? */
    double cnt = 0.0, st = 0.0, sy = 0.0;
    for (int64_t j = 0; j < m; j++)
        if (isfinite(y[j])) {
            cnt += 1.0;
            st += t[j] - tend;
            sy += y[j];
        }
    if (!(cnt >= min_points)) return 0;
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
    const double toward = -ols * sign;
    const double room = (level_ls - limit) * sign;
    /* a trend that does not stand out of its own noise cannot reach confidence 0.5 */
    if (!(toward > 0.0 && change2 >= rvar && (room < max_eta * toward || room <= 0.0))) return 0;
    /* Theil-Sen: the median of all pairwise slopes */
    const int64_t npairs = m * (m - 1) / 2;
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
    const double tw = -slope * sign;
    const double rm = (level - limit) * sign;
    const double eta = rm <= 0.0 ? 0.0 : rm / (tw > 0.0 ? tw : NAN);
    if (!(isfinite(eta) && eta <= max_eta)) return 0;
    *eta_out = eta;
    *conf_out = conf;
    *rate_out = slope;
    return 1;
}

typedef struct {
    int64_t k;               /* resources (ring columns) */
    int64_t cap;             /* ring rows in use (the ring has cap + 1 rows; the last stays NaN) */
    int64_t pos;             /* next ring row to write */
    int64_t n;               /* samples in the ring (<= cap) */
    int64_t nspans;
    int64_t max_points;      /* a window is subsampled evenly to at most this many points */
    const double *ring;      /* (cap + 1, k) */
    const double *tring;     /* cap + 1 */
    const double *spans;     /* nspans window lengths, seconds */
    const int8_t *due;       /* nspans: refit this window now */
    const double *sign;      /* k: 1 = falls to its limit, -1 = rises to it */
    const double *limit;     /* k */
    double min_points;
    double max_eta;
    double now;
    double *res;             /* (nspans, 3, k): each window's last eta, confidence, rate */
    double *best;            /* (3, k): the most confident window's, per resource */
} trend_ctx;

/* Forecaster._compute + _fit + the choice in _publish: refit the due windows (the last `span`
 * seconds of the ring, subsampled like np.linspace(0, size - 1, max_points).round()), then pick
 * per resource the window with the highest confidence (the first on ties; none when all are 0).
 * Returns 0, or -1 when scratch memory cannot be had. */
int heald_trend_update(const trend_ctx *c) {
    const int64_t k = c->k, mp = c->max_points;
    if (c->n <= 0 || k <= 0 || mp < 2) return 0;
    const int64_t npairs = mp * (mp - 1) / 2;
    double *buf = malloc(sizeof(double) * (size_t)(5 * mp + 2 * npairs + 1));
    int64_t *rows = malloc(sizeof(int64_t) * (size_t)(c->n + 1));
    if (buf == NULL || rows == NULL) {
        free(buf);
        free(rows);
        return -1;
    }
    double *t = buf, *y = buf + mp, *resid = buf + 2 * mp, *dev = buf + 3 * mp;
    double *sl = buf + 5 * mp, *scratch = buf + 5 * mp + npairs;
    int64_t *pick = (int64_t *)(void *)(buf + 4 * mp); /* mp int64s share a double's size */
    for (int64_t si = 0; si < c->nspans; si++) {
        if (!c->due[si]) continue;
        double *eta = c->res + (si * 3 + 0) * k, *conf = c->res + (si * 3 + 1) * k;
        double *rate = c->res + (si * 3 + 2) * k;
        for (int64_t r = 0; r < k; r++) {
            eta[r] = NAN;
            conf[r] = 0.0;
            rate[r] = 0.0;
        }
        /* the ring rows inside the window, oldest first */
        int64_t size = 0;
        for (int64_t i = 0; i < c->n; i++) {
            const int64_t row = ((c->pos - c->n + i) % c->cap + c->cap) % c->cap;
            if (c->tring[row] >= c->now - c->spans[si]) rows[size++] = row;
        }
        if ((double)size < c->min_points || size < 1) continue;
        int64_t m = size;
        if (size > mp) {
            const double step = (double)(size - 1) / (double)(mp - 1);
            for (int64_t i = 0; i < mp; i++) {
                const double v = i == mp - 1 ? (double)(size - 1) : (double)i * step + 0.0;
                pick[i] = rows[(int64_t)rint(v)];
            }
            m = mp;
        } else {
            for (int64_t i = 0; i < size; i++) pick[i] = rows[i];
        }
        for (int64_t j = 0; j < m; j++) t[j] = c->tring[pick[j]];
        for (int64_t r = 0; r < k; r++) {
            for (int64_t j = 0; j < m; j++) y[j] = c->ring[pick[j] * k + r];
            fit_row(t, y, m, c->sign[r], c->limit[r], c->min_points, c->max_eta, sl, resid, dev,
                    scratch, eta + r, conf + r, rate + r);
        }
    }
    for (int64_t r = 0; r < k; r++) {
        double be = NAN, bc = 0.0, br = 0.0;
        for (int64_t si = 0; si < c->nspans; si++) {
            const double cf = c->res[(si * 3 + 1) * k + r];
            if (cf > bc) {
                be = c->res[(si * 3 + 0) * k + r];
                bc = cf;
                br = c->res[(si * 3 + 2) * k + r];
            }
        }
        c->best[0 * k + r] = be;
        c->best[1 * k + r] = bc;
        c->best[2 * k + r] = br;
    }
    free(rows);
    free(buf);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Anomaly detector (detector.py: StreamingDetector.score / explain).                           */

typedef struct {
    int64_t d;                 /* features */
    int64_t nc;                /* k-means centroids */
    int64_t npca;              /* PCA components (0 = off) */
    int64_t top_k;             /* robust-z: mean of the top_k largest */
    const double *vec;         /* the feature window's output vector */
    const int64_t *idx;        /* d: the model's features in it */
    const double *med;         /* d: training median (imputes missing values) */
    const double *inv_scale;   /* d */
    const double *centroids;   /* (nc, d) */
    const double *c2;          /* nc: squared centroid norms */
    const double *pca_mean;    /* d */
    const double *pca_w;       /* (npca, d) */
    const double *fac;         /* 4: weight / divisor per component (rz, km, delta, pca) */
    const int8_t *use;         /* 4 */
    double *x;                 /* d: the current sample, imputed */
    int8_t *missing;           /* d */
    double *prev;              /* d: previous sample (missing entries keep older values) */
    double *last_ref;          /* d: what delta was measured against, for explain */
    double *z;                 /* d scratch */
    double *km;                /* nc scratch */
    double *pc;                /* npca scratch */
    double *contrib;           /* d: explain output */
    int64_t has_prev;
    int64_t any_missing;
} det_ctx;

/* Gather the sample from vec into x, missing values imputed with the training median. */
static void det_load(det_ctx *c) {
    int64_t any_missing = 0;
    for (int64_t j = 0; j < c->d; j++) {
        const double v = c->vec[c->idx[j]];
        const int bad = !isfinite(v);
        c->missing[j] = (int8_t)bad;
        c->x[j] = bad ? c->med[j] : v;
        any_missing |= bad;
    }
    c->any_missing = any_missing;
}

/* The sample's PCA coordinates, pc = W (x - mean). */
static void pca_project(det_ctx *c) {
    for (int64_t p = 0; p < c->npca; p++) {
        const double *w = c->pca_w + p * c->d;
        double dot = 0.0;
        for (int64_t j = 0; j < c->d; j++) dot += w[j] * (c->x[j] - c->pca_mean[j]);
        c->pc[p] = dot;
    }
}

/* Feature j of the reconstruction residual (x - mean) - pc W, after pca_project. */
static double pca_residual(const det_ctx *c, int64_t j) {
    double r = c->x[j] - c->pca_mean[j];
    for (int64_t p = 0; p < c->npca; p++) r -= c->pc[p] * c->pca_w[p * c->d + j];
    return r;
}

/* Raw (unsmoothed) score of the sample in vec; advances prev / last_ref like score(). */
double heald_det_score(det_ctx *c) {
    const int64_t d = c->d;
    det_load(c);
    const double *x = c->x;
    double raw = 0.0;
    if (c->use[0] && c->top_k > 0 && c->top_k <= d) {
        for (int64_t j = 0; j < d; j++) c->z[j] = fabs(x[j] - c->med[j]) * c->inv_scale[j];
        kth_smallest(c->z, d, d - c->top_k);
        double s = 0.0;
        for (int64_t j = d - c->top_k; j < d; j++) s += c->z[j];
        raw += c->fac[0] * s / (double)c->top_k;
    }
    if (c->use[1] && c->nc > 0) {
        double best = INFINITY, xx = 0.0;
        for (int64_t q = 0; q < c->nc; q++) {
            const double *cq = c->centroids + q * d;
            double dot = 0.0;
            for (int64_t j = 0; j < d; j++) dot += cq[j] * x[j];
            const double dist = dot * -2.0 + c->c2[q];
            c->km[q] = dist;
            if (dist < best) best = dist;
        }
        for (int64_t j = 0; j < d; j++) xx += x[j] * x[j];
        const double b = best + xx;
        raw += c->fac[1] * sqrt(b > 0.0 ? b : 0.0);
    }
    if (c->has_prev && c->use[2]) {
        double s = 0.0;
        for (int64_t j = 0; j < d; j++) {
            const double df = c->missing[j] ? 0.0 : x[j] - c->prev[j];
            s += df * df;
        }
        raw += c->fac[2] * s;
    }
    if (c->use[3] && c->npca > 0) {
        double s = 0.0;
        pca_project(c);
        for (int64_t j = 0; j < d; j++) {
            const double r = pca_residual(c, j);
            s += r * r;
        }
        raw += c->fac[3] * s;
    }
    for (int64_t j = 0; j < d; j++) {
        c->last_ref[j] = c->has_prev ? c->prev[j] : x[j];
        if (!c->has_prev || !c->missing[j]) c->prev[j] = x[j];
    }
    c->has_prev = 1;
    return raw;
}

/* Per-feature contributions to the raw score of the last scored sample (into contrib), and the
 * indices of the `top` largest positive ones, largest first, lowest index first among equals
 * (a stable sort's order), into order; returns their number. */
int64_t heald_det_explain(det_ctx *c, int64_t top, int64_t *order) {
    const int64_t d = c->d;
    det_load(c);
    const double *x = c->x;
    double *ct = c->contrib;
    for (int64_t j = 0; j < d; j++) ct[j] = 0.0;
    if (c->use[0] && c->top_k > 0 && c->top_k <= d) {
        for (int64_t j = 0; j < d; j++) c->z[j] = fabs(x[j] - c->med[j]) * c->inv_scale[j];
        /* the top_k largest: threshold at the (d - top_k)-th smallest, ties by lowest index */
        for (int64_t j = 0; j < d; j++) c->contrib[j] = c->z[j]; /* scratch copy */
        const double cut = kth_smallest(c->contrib, d, d - c->top_k);
        int64_t above = 0;
        for (int64_t j = 0; j < d; j++) above += c->z[j] > cut;
        int64_t ties = c->top_k - above;
        for (int64_t j = 0; j < d; j++) ct[j] = 0.0;
        for (int64_t j = 0; j < d; j++) {
            const double zj = c->z[j];
            if (zj > cut || (zj == cut && ties-- > 0)) ct[j] += c->fac[0] * zj / (double)c->top_k;
        }
    }
    if (c->use[1] && c->nc > 0) {
        int64_t jbest = 0;
        double best = INFINITY;
        for (int64_t q = 0; q < c->nc; q++) {
            const double *cq = c->centroids + q * d;
            double dot = 0.0;
            for (int64_t j = 0; j < d; j++) dot += cq[j] * x[j];
            const double dist = c->c2[q] - 2.0 * dot;
            if (dist < best) {
                best = dist;
                jbest = q;
            }
        }
        const double *cq = c->centroids + jbest * d;
        double ss = 0.0;
        for (int64_t j = 0; j < d; j++) ss += (x[j] - cq[j]) * (x[j] - cq[j]);
        if (ss > 0.0) {
            const double f = c->fac[1] * sqrt(ss) / ss;
            for (int64_t j = 0; j < d; j++) ct[j] += f * (x[j] - cq[j]) * (x[j] - cq[j]);
        }
    }
    if (c->use[2] && c->has_prev) {
        for (int64_t j = 0; j < d; j++) {
            const double df = c->missing[j] ? 0.0 : x[j] - c->last_ref[j];
            ct[j] += c->fac[2] * df * df;
        }
    }
    if (c->use[3] && c->npca > 0) {
        pca_project(c);
        for (int64_t j = 0; j < d; j++) {
            const double r = pca_residual(c, j);
            ct[j] += c->fac[3] * r * r;
        }
    }
    int64_t n = 0;
    for (; n < top; n++) {
        int64_t best = -1;
        for (int64_t j = 0; j < d; j++) {
            if (!(ct[j] > 0.0)) continue;
            int taken = 0;
            for (int64_t q = 0; q < n; q++) taken |= order[q] == j;
            if (taken) continue;
            if (best < 0 || ct[j] > ct[best]) best = j;
        }
        if (best < 0) break;
        order[n] = best;
    }
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* Failure classifier (classifier.py: Scorer.failure): p = 1 / (1 + exp(a (W x + bias) + b)). */
int heald_clf_score(const double *vec, const int64_t *idx, int64_t d, const double *med,
                    const double *w, const double *bias, const double *a, const double *b,
                    int64_t nclass, double *xbuf, double *p) {
    for (int64_t j = 0; j < d; j++) {
        const double v = vec[idx[j]];
        xbuf[j] = isnan(v) ? med[j] : v;
    }
    for (int64_t q = 0; q < nclass; q++) {
        const double *wq = w + q * d;
        double z = 0.0;
        for (int64_t j = 0; j < d; j++) z += wq[j] * xbuf[j];
        z = a[q] * (z + bias[q]) + b[q];
        p[q] = 1.0 / (1.0 + exp(z));
    }
    return 0;
}
