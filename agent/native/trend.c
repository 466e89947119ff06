/* heald's native kernels: the forecaster's trend fit (agent/score/forecast.py: Forecaster._fit
 * and robust_trend). */
#include <stdlib.h> /* malloc: the refit's scratch */

#include "kernels.h"

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
