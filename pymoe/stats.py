"""Statistics for comparing runs (scipy): summaries with 95% confidence intervals, paired
tests and effect sizes."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st


def summarize(values) -> dict:
    """mean, std (ddof=1), median, IQR, min, max and the t-based 95% CI of the mean."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("summarize needs at least one value")
    out = {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
           "q1": float(np.percentile(x, 25)), "q3": float(np.percentile(x, 75)),
           "min": float(x.min()), "max": float(x.max())}
    if x.size > 1:
        std = float(x.std(ddof=1))
        half = float(_st.t.ppf(0.975, x.size - 1) * std / math.sqrt(x.size))
        out.update(std=std, ci95_low=out["mean"] - half, ci95_high=out["mean"] + half)
    else:
        out.update(std=0.0, ci95_low=out["mean"], ci95_high=out["mean"])
    return out


def compare_paired(a, b) -> dict:
    """a vs b measured on the same inputs (same seeds): mean difference a-b with its 95% CI,
    paired t-test p-value, Wilcoxon signed-rank p-value (None below 6 pairs or when every
    difference is zero), and Cohen's d_z (mean difference over the std of differences)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.size < 2:
        raise ValueError("compare_paired needs two equal-length samples of at least 2 values")
    d = a - b
    diff = summarize(d)
    sd = diff["std"]
    if sd == 0:
        t_p = 1.0 if diff["mean"] == 0 else 0.0
        dz = 0.0 if diff["mean"] == 0 else math.copysign(math.inf, diff["mean"])
    else:
        t_p = float(_st.ttest_rel(a, b).pvalue)
        dz = diff["mean"] / sd
    w_p = None
    if a.size >= 6 and np.any(d != 0):
        w_p = float(_st.wilcoxon(a, b).pvalue)
    return {"mean_diff": diff["mean"], "ci95_low": diff["ci95_low"], "ci95_high": diff["ci95_high"],
            "t_test_p": t_p, "wilcoxon_p": w_p, "cohens_dz": dz}
