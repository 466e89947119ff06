/* heald's native scoring kernels: the library's ABI and the helpers its files share.
 *
 * Plain C99 with no Python API: one shared library (libheald_kernels.so, built by hatch_build.py
 * from kernels.c, window.c, trend.c, detector.c and classifier.c), loaded with ctypes
 * (agent/native/__init__.py, which mirrors the structs below) and called on numpy buffers that
 * the Python objects own and keep alive. Each function is a line-by-line scalar port of the numpy
 * reference path it replaces (agent/features/window.py, agent/score/forecast.py, detector.py,
 * classifier.py), which stays in the tree as the fallback and as the oracle
 * tests/test_native_kernels.py compares against. Nothing here allocates per sample; the trend
 * refit (every 10 samples) allocates its scratch per call and returns -1 if it cannot. Index
 * arrays are validated by the Python side when they are bound.
 *
 * Bump HEALD_KERNELS_ABI whenever a struct layout or a signature changes: the loader refuses a
 * library whose ABI differs (a stale build) and the numpy path runs instead.
 */
#ifndef HEALD_KERNELS_H
#define HEALD_KERNELS_H

#include <math.h>
#include <stdint.h>

#define HEALD_KERNELS_ABI 6

int heald_kernels_abi(void); /* kernels.c */

/* ------------------------------------------------------------------------------------------ */
/* Feature window (window.c).                                                                 */
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

int heald_fw_push(const fw_ctx *c, int64_t pos, double t, double mono, int64_t dpos);
int heald_fw_rebase(const fw_ctx *c, double t0, double t);

/* ------------------------------------------------------------------------------------------ */
/* Trend fit (trend.c).                                                                       */
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

int heald_trend_update(const trend_ctx *c);

/* ------------------------------------------------------------------------------------------ */
/* Anomaly detector (detector.c).                                                             */
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

double heald_det_score(det_ctx *c);
int64_t heald_det_explain(det_ctx *c, int64_t top, int64_t *order);

/* ------------------------------------------------------------------------------------------ */
/* Failure classifier (classifier.c).                                                         */
int heald_clf_score(const double *vec, const int64_t *idx, int64_t d, const double *med,
                    const double *w, const double *bias, const double *a, const double *b,
                    int64_t nclass, double *xbuf, double *p);

/* ------------------------------------------------------------------------------------------ */
/* Helpers of more than one kernel file.                                                      */
/* static inline: each file gets its own copy, so that the library still exports only the
 * heald_* entry points above. */

/* np.maximum: NaN when either is NaN */
static inline double npmax(double a, double b) { return (isnan(a) || isnan(b)) ? NAN : (a > b ? a : b); }

/* The k-th smallest of a[0..n) (0-based), partially reordering a: a[k] holds it and every
 * entry after k is >= it. No NaN allowed. */
static inline double kth_smallest(double *a, int64_t n, int64_t k) {
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

#endif /* HEALD_KERNELS_H */
