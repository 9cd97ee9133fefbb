"""The numba kernels behind :mod:`meshprobe.kernels` (imported only when a read first runs on CPU).

A read, for every token t: y[t] = sum_i coef[i, t] x_i[t]. Arrays: rows [tokens, d], coef [n, tokens];
`values` and `rows` are tuples padded to a fixed length (one compiled signature), of which the first n are used.
"""
import numba

FAST = {"reassoc", "nsz", "contract"}  # let the dot products vectorize; IEEE special values unchanged


@numba.njit(cache=True, boundscheck=False, fastmath=FAST)
def forward(out, coef, values, n):
    tokens, d = out.shape
    for t in range(tokens):
        c, x = coef[0, t], values[0]
        for k in range(d):
            out[t, k] = c * x[t, k]
        for i in range(1, n):
            c, x = coef[i, t], values[i]
            for k in range(d):
                out[t, k] += c * x[t, k]


@numba.njit(cache=True, boundscheck=False, fastmath=FAST)
def backward(grad, coef, values, rows, n, fresh, grad_coef):
    tokens, d = grad.shape
    for t in range(tokens):
        for i in range(n):
            c, x, row = coef[i, t], values[i], rows[i]
            dot = 0.0  # d loss / d coef[i, t], accumulated in float64
            if fresh:  # the chain's last read: the rows are written, not added to
                for k in range(d):
                    dot += grad[t, k] * x[t, k]
                    row[t, k] = c * grad[t, k]
            else:
                for k in range(d):
                    dot += grad[t, k] * x[t, k]
                    row[t, k] += c * grad[t, k]
            grad_coef[i, t] = dot
