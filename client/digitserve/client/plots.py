"""A load test's latencies and throughput as a plot (the confusion matrix is ``digitserve.plots``')."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt


def plot_loadtest(
    path: Path,
    latencies_ms: npt.ArrayLike,
    completion_times_s: npt.ArrayLike,
    title: str,
    *,
    percentiles: Sequence[float] = (50, 90, 99),
) -> Path:
    """A load test as one PNG: the latency histogram (log-spaced bins, percentiles marked) and the
    throughput over time (completed calls per second, in up to 50 bins of at least 50 ms).

    ``latencies_ms[i]`` is the latency of successful call i, ``completion_times_s[i]`` when it
    completed, in seconds since the start of the run."""
    try:
        from matplotlib.figure import Figure  # Figure alone renders with Agg: no pyplot, no display
    except ImportError as exc:  # the client has matplotlib only with the [plot] extra
        raise RuntimeError("plotting needs matplotlib: pip install 'digitserve[plot]'") from exc
    latencies = np.asarray(latencies_ms, dtype=np.float64).ravel()
    done = np.asarray(completion_times_s, dtype=np.float64).ravel()
    if latencies.size != done.size:
        raise ValueError(f"{latencies.size} latencies but {done.size} completion times")
    fig = Figure(figsize=(12, 4.5))
    hist_ax, rate_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if latencies.size:
        low, high = max(float(latencies.min()), 1e-3), max(float(latencies.max()), 1e-3)
        spread = high > low * 1.01
        bins: int | list[float] = np.geomspace(low, high * 1.0001, 60).tolist() if spread else 20
        hist_ax.hist(np.maximum(latencies, 1e-3), bins=bins, color="tab:blue", alpha=0.8)
        if spread:
            hist_ax.set_xscale("log")
        for q, style in zip(percentiles, ("-", "--", ":", "-."), strict=False):
            value = float(np.percentile(latencies, q))
            hist_ax.axvline(value, color="tab:red", linestyle=style, label=f"p{q:g} {value:.2f} ms")
        hist_ax.legend()
        span = max(float(done.max()), 1e-6)
        bins_count = max(1, min(50, int(span / 0.05)))  # bins of span/50, at least 50 ms wide
        counts, edges = np.histogram(done, bins=np.linspace(0.0, span, bins_count + 1))
        rates = counts / (span / bins_count)
        rate_ax.step(edges, np.append(rates, rates[-1]), where="post", color="tab:green")
        rate_ax.axhline(latencies.size / span, color="gray", linestyle="--",
                        label=f"mean {latencies.size / span:.0f} calls/s")
        rate_ax.set_xlim(0, span)
        rate_ax.set_ylim(bottom=0)
        rate_ax.legend()
    else:
        for ax in (hist_ax, rate_ax):
            ax.text(0.5, 0.5, "no successful calls", ha="center", va="center", transform=ax.transAxes)
    hist_ax.set_title(f"latency of {latencies.size} successful calls")
    hist_ax.set_xlabel("latency (ms)")
    hist_ax.set_ylabel("calls")
    rate_ax.set_title("throughput over time")
    rate_ax.set_xlabel("seconds since the start")
    rate_ax.set_ylabel("completed calls per second")
    for ax in (hist_ax, rate_ax):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
