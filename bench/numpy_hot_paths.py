#!/usr/bin/env python3
"""numpy + scipy side of the hot-path benchmark (see bench/README.md).

The same log-space formulas as `benches/hot_paths.rs`, on inputs of the same shape
(normalized log-probabilities from logits 3 * N(0, 1)), single thread, float64:

  did          d = la - lb;  d - logsumexp(d)                           (returns the array)
  entropy      -sum(exp(l) * l)
  js           lm = logaddexp(la, lb) - log 2;
               0.5 * (sum(exp(la) * (la - lm)) + sum(exp(lb) * (lb - lm)))
  log_softmax  f - logsumexp(f)                                        (returns the array)

Each timing is the median of 5 runs (after one untimed warm-up run); the rate is N / median,
from wall time and from thread CPU time (which excludes time given to other processes).
Usage: python3 bench/numpy_hot_paths.py [N ...]   (default 1e3 1e5 1e7)
"""

import os

# Single thread, as the Rust side (these paths are elementwise and do not use BLAS threads,
# but pin them anyway). Must be set before numpy is imported.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import platform
import statistics
import sys
import time

import numpy as np
import scipy
from scipy.special import logsumexp

LOG2 = np.log(2.0)


def did(la, lb):
    d = la - lb
    return d - logsumexp(d)


def entropy(l):
    return -np.sum(np.exp(l) * l)


def js(la, lb):
    lm = np.logaddexp(la, lb) - LOG2
    return 0.5 * (np.sum(np.exp(la) * (la - lm)) + np.sum(np.exp(lb) * (lb - lm)))


def log_softmax(f):
    return f - logsumexp(f)


def median_time(fn, *args, runs=5):
    """Median wall time and median thread CPU time of `runs` calls, after one warm-up call."""
    fn(*args)  # warm-up
    wall, cpu = [], []
    for _ in range(runs):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fn(*args)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def fmt_n(n):
    e = len(str(n)) - 1
    return f"10^{e}" if n == 10**e else str(n)


def main():
    sizes = [int(float(a)) for a in sys.argv[1:]] or [10**3, 10**5, 10**7]
    print(
        f"numpy {np.__version__}, scipy {scipy.__version__}, python {platform.python_version()}, "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}"
    )
    print("median of 5 runs, single thread, float64")
    print("(elements/s from wall time; last column from thread CPU time)")
    print(f"{'path':<16} {'N':>6} {'median wall':>12} {'elements/s':>14} {'(CPU time)':>16}")
    rng = np.random.default_rng(1)
    for n in sizes:
        f = 3.0 * rng.standard_normal(n)
        la = log_softmax(3.0 * rng.standard_normal(n))
        lb = log_softmax(3.0 * rng.standard_normal(n))
        for name, fn, args in (
            ("did", did, (la, lb)),
            ("entropy", entropy, (la,)),
            ("js", js, (la, lb)),
            ("log_softmax", log_softmax, (f,)),
        ):
            wall, cpu = median_time(fn, *args)
            print(
                f"{name:<16} {fmt_n(n):>6} {wall * 1e3:>10.3f}ms {n / wall / 1e6:>12.1f} M "
                f"{n / cpu / 1e6:>12.1f} M"
            )


if __name__ == "__main__":
    main()
