"""The CUDA side of :mod:`ddref.kernels`: one ``cupy.ElementwiseKernel`` per kernel, each
thread computing one output element by the same index arithmetic as the numpy emulations in
``ddref.kernels`` (which the fake device of the tests runs, and tests/test_fused.py checks
against the readable numpy path; the ``gpu`` tests compare these kernels with numpy).

Nothing here imports CuPy: every launcher takes the ``cupy`` module as its first argument,
and kernels are compiled on first use.
"""

from __future__ import annotations


def _out_size(h, w, kh, kw, pad):
    return h + 2 * pad - kh + 1, w + 2 * pad - kw + 1


# Layout (C, H, W, N), batch innermost: thread i's batch index is i % n, so neighbouring
# threads read and write neighbouring addresses.
#
# The pooling kernels' index arithmetic.  _WINDOW: thread i is window (m, p, q, b) of the pooled
# output (O, Ho/2, Wo/2, N); k is its top-left entry in z (O, Ho, Wo, N), k + right / k + down
# its neighbours.  _ENTRY: thread i is entry (m, y, x, b) of z, and k its window in the output
# (cropped rows and columns map to the last window; their hit is 0).
_WINDOW = """
        int b = i % n; int r = i / n;
        int q = r % wp; r /= wp; int p = r % hp; int m = r / hp;
        long long k = ((long long)(m * ho + 2 * p) * wo + 2 * q) * n + b;
        long long right = n, down = (long long)wo * n;"""
_ENTRY = """
        int b = i % n; int r = i / n;
        int x = r % wo; r /= wo; int y = r % ho; int m = r / ho;
        int p = min(y / 2, hp - 1), q = min(x / 2, wp - 1);
        long long k = ((long long)(m * hp + p) * wp + q) * n + b;"""

SOURCES = {
    "patches": (
        "raw T x, int32 n, int32 h, int32 w, int32 ho, int32 wo, int32 kh, int32 kw, int32 pad", "T col",
        """
        int b = i % n; int r = i / n;
        int ox = r % wo; r /= wo;
        int oy = r % ho; r /= ho;
        int dj = r % kw; r /= kw;
        int di = r % kh; int ch = r / kh;
        int y = oy + di - pad, xx = ox + dj - pad;
        col = (y >= 0 && y < h && xx >= 0 && xx < w) ? x[((long long)(ch * h + y) * w + xx) * n + b] : (T)0;
        """),
    "patches_adjoint": (
        "raw T col, int32 c, int32 n, int32 h, int32 w, int32 ho, int32 wo, int32 kh, int32 kw, int32 pad",
        "T img",
        """
        int b = i % n; int r = i / n;
        int xx = r % w; r /= w;
        int y = r % h; int ch = r / h;
        T acc = 0;
        for (int di = 0; di < kh; ++di) {
            int oy = y + pad - di;
            if (oy < 0 || oy >= ho) continue;
            for (int dj = 0; dj < kw; ++dj) {
                int ox = xx + pad - dj;
                if (ox < 0 || ox >= wo) continue;
                acc += col[((long long)(((ch * kh + di) * kw + dj) * ho + oy) * wo + ox) * n + b];
            }
        }
        img = acc;
        """),
    "pool": (
        "raw T z, raw T bias, int32 n, int32 ho, int32 wo, int32 hp, int32 wp", "T out, T scale, raw T hit",
        _WINDOW + """
        T bb = bias[m];
        T a = z[k] + bb, bt = z[k + right] + bb, c = z[k + down] + bb, d = z[k + down + right] + bb;
        T ab = a > bt || a != a ? a : bt, cd = c > d || c != c ? c : d;
        T top = ab > cd || ab != ab ? ab : cd;
        T ha = a == top, hb = bt == top, hc = c == top, hd = d == top;
        hit[k] = ha; hit[k + right] = hb; hit[k + down] = hc; hit[k + down + right] = hd;
        T relu = top > 0 ? (T)1 : (T)0;
        out = top * relu;
        scale = relu / (ha + hb + hc + hd);
        """),
    "unpool": (
        "T hit, raw T g, raw T scale, int32 n, int32 ho, int32 wo, int32 hp, int32 wp", "T gz",
        _ENTRY + """
        gz = hit * (g[k] * scale[k]);
        """),
    "unpool_pair": (
        "T hit, raw T g, raw T gd, raw T scale, int32 n, int32 ho, int32 wo, int32 hp, int32 wp", "T gz, T gzd",
        _ENTRY + """
        gz = hit * (g[k] * scale[k]); gzd = hit * (gd[k] * scale[k]);
        """),
    "pool_tangent_sum": (
        "raw T a, raw T bias, raw T c, bool has_c, raw T hit, T scale, int32 n, int32 ho, int32 wo, "
        "int32 hp, int32 wp", "T pd",
        _WINDOW + """
        T bb = bias[m], s = 0;
        long long at[4] = {k, k + right, k + down, k + down + right};
        for (int e = 0; e < 4; ++e) {
            T zd = a[at[e]] + bb;
            if (has_c) zd += c[at[e]];
            s += zd * hit[at[e]];
        }
        pd = s * scale;
        """),
    "pool_tangent": (
        "raw T zd, raw T hit, T scale, int32 n, int32 ho, int32 wo, int32 hp, int32 wp", "T pd",
        _WINDOW + """
        pd = (zd[k] * hit[k] + zd[k + right] * hit[k + right] + zd[k + down] * hit[k + down]
              + zd[k + down + right] * hit[k + down + right]) * scale;
        """),
    "bias_relu": (
        "T mm, T b", "T out, T mask",
        "T z = mm + b; mask = z > 0 ? (T)1 : (T)0; out = z * mask;"),
    "add_mask": ("T a, T b, T mask", "T out", "out = (a + b) * mask;"),
    "step": ("T p, T g, T lr", "T out", "out = p - lr * g;"),
    "add3_mask": ("T a, T b, T c, T mask", "T out", "out = (a + b + c) * mask;"),
    "mask_both": ("T g, T gd, T mask", "T og, T ogd", "og = g * mask; ogd = gd * mask;"),
    "xent": (           # one thread per row of k logits
        "raw T z, raw T t, int32 k, int32 n", "T row_loss, T mass, raw T g, raw T p, raw T logp",
        """
        long long o = (long long)i * k;
        T top = z[o];
        for (int c = 1; c < k; ++c) top = z[o + c] > top ? z[o + c] : top;
        T s = 0;
        for (int c = 0; c < k; ++c) s += exp(z[o + c] - top);
        T lse = log(s), tm = 0, l = 0;
        for (int c = 0; c < k; ++c) {
            T lp = (z[o + c] - top) - lse;
            logp[o + c] = lp; p[o + c] = exp(lp); tm += t[o + c]; l += t[o + c] * lp;
        }
        for (int c = 0; c < k; ++c) g[o + c] = (p[o + c] * tm - t[o + c]) / n;
        row_loss = -l / n; mass = tm;
        """),
    "xent_tangent": (
        "raw T p, T mass, raw T zd, int32 k, int32 n", "raw T gd, raw T td",
        """
        long long o = (long long)i * k;
        T s = 0;
        for (int c = 0; c < k; ++c) s += p[o + c] * zd[o + c];
        for (int c = 0; c < k; ++c) {
            T lpd = zd[o + c] - s;
            gd[o + c] = p[o + c] * lpd * mass / n; td[o + c] = -lpd / n;
        }
        """),
}
_COMPILED: dict = {}


def _kernel(cp, name):
    if name not in _COMPILED:
        in_params, out_params, body = SOURCES[name]
        _COMPILED[name] = cp.ElementwiseKernel(in_params, out_params, body, f"ddref_{name}")
    return _COMPILED[name]


def _cupy_patches(cp, x, kh, kw, pad):
    c, h, w, n = x.shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    out = cp.empty((c * kh * kw, ho * wo * n), dtype=x.dtype)
    return _kernel(cp, "patches")(cp.ascontiguousarray(x), n, h, w, ho, wo, kh, kw, pad, out)


def _cupy_patches_adjoint(cp, cols, x_shape, kh, kw, pad):
    c, h, w, n = x_shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    out = cp.empty(x_shape, dtype=cols.dtype)
    return _kernel(cp, "patches_adjoint")(cp.ascontiguousarray(cols), c, n, h, w, ho, wo, kh, kw, pad, out)


def _cupy_pool(cp, z, bias, z_shape):
    o, ho, wo, n = z_shape
    shape = (o, ho // 2, wo // 2, n)
    out, scale = cp.empty(shape, dtype=z.dtype), cp.empty(shape, dtype=z.dtype)
    hit = (cp.zeros if ho % 2 or wo % 2 else cp.empty)((o, ho * wo * n), dtype=z.dtype)
    _kernel(cp, "pool")(cp.ascontiguousarray(z), cp.ascontiguousarray(bias), n, ho, wo, ho // 2, wo // 2,
                        out, scale, hit)
    return out, (hit, scale)


def _cupy_unpool_pair(cp, g, g_dot, route, z_shape):
    hit, scale = route
    o, ho, wo, n = z_shape
    out, out_dot = cp.empty((o, ho * wo * n), dtype=hit.dtype), cp.empty((o, ho * wo * n), dtype=hit.dtype)
    _kernel(cp, "unpool_pair")(hit, cp.ascontiguousarray(g), cp.ascontiguousarray(g_dot), scale,
                               n, ho, wo, ho // 2, wo // 2, out, out_dot)
    return out, out_dot


def _cupy_pool_tangent_sum(cp, a, bias, c, has_c, route, z_shape):
    hit, scale = route
    o, ho, wo, n = z_shape
    out = cp.empty((o, ho // 2, wo // 2, n), dtype=hit.dtype)
    return _kernel(cp, "pool_tangent_sum")(cp.ascontiguousarray(a), cp.ascontiguousarray(bias),
                                           cp.ascontiguousarray(c), has_c, hit, scale, n, ho, wo,
                                           ho // 2, wo // 2, out)


def _cupy_unpool(cp, g, route, z_shape):
    hit, scale = route
    o, ho, wo, n = z_shape
    out = cp.empty((o, ho * wo * n), dtype=hit.dtype)
    return _kernel(cp, "unpool")(hit, cp.ascontiguousarray(g), scale, n, ho, wo, ho // 2, wo // 2, out)


def _cupy_pool_tangent(cp, z_dot, route, z_shape):
    hit, scale = route
    o, ho, wo, n = z_shape
    out = cp.empty((o, ho // 2, wo // 2, n), dtype=hit.dtype)
    return _kernel(cp, "pool_tangent")(cp.ascontiguousarray(z_dot), hit, scale, n, ho, wo, ho // 2, wo // 2, out)


def _cupy_xent(cp, z, t):
    z, t = cp.ascontiguousarray(z), cp.ascontiguousarray(t)
    rows, k, n = z.shape[:-1], z.shape[-1], z.shape[-2]
    row_loss, mass = cp.empty(rows, dtype=z.dtype), cp.empty(rows, dtype=z.dtype)
    g, p, log_p = cp.empty_like(z), cp.empty_like(z), cp.empty_like(z)
    _kernel(cp, "xent")(z, t, k, n, row_loss, mass, g, p, log_p)
    return cp.sum(row_loss), g, (p, mass[..., None], log_p)


def _cupy_xent_tangent(cp, p, mass, z_dot):
    z_dot = cp.ascontiguousarray(z_dot)
    g_dot, t_dot = cp.empty_like(z_dot), cp.empty_like(z_dot)
    _kernel(cp, "xent_tangent")(p, mass[..., 0], z_dot, z_dot.shape[-1], z_dot.shape[-2], g_dot, t_dot)
    return g_dot, t_dot


def _elementwise(name):
    return lambda cp, *args: _kernel(cp, name)(*args)


LAUNCHERS = {"patches": _cupy_patches, "patches_adjoint": _cupy_patches_adjoint, "pool": _cupy_pool,
         "unpool": _cupy_unpool, "pool_tangent": _cupy_pool_tangent,
         "unpool_pair": _cupy_unpool_pair, "pool_tangent_sum": _cupy_pool_tangent_sum,
         "bias_relu": _elementwise("bias_relu"), "add_mask": _elementwise("add_mask"),
         "add3_mask": _elementwise("add3_mask"), "step": _elementwise("step"), "mask_both": _elementwise("mask_both"),
         "xent": _cupy_xent, "xent_tangent": _cupy_xent_tangent}
