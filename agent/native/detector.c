/* heald's native kernels: the anomaly detector (agent/score/detector.py: StreamingDetector.score
 * and explain). */
#include "kernels.h"

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
