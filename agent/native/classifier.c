/* heald's native kernels: the failure classifier (agent/score/classifier.py: Scorer.failure). */
#include "kernels.h"

/* p = 1 / (1 + exp(a (W x + bias) + b)), one row of W per class. */
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
