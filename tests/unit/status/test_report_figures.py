"""The campaign report's latency figures and delivery timeline, computed from sorted lists by
bisection (bench/campaign_page.py), give what one pass per value gives, on any data."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_pepipost.status import reports


def latency_one_value_at_a_time(values: list[float]) -> reports.Latency:
    """The plain definition: each value clamped at 0, counted in the first bucket it is under."""
    clamped = sorted(max(value, 0.0) for value in values)
    counts = Counter()
    for value in clamped:
        bucket = next((i for i, bound in enumerate(reports.LATENCY_BUCKETS) if value < bound), None)
        counts[len(reports.LATENCY_BUCKETS) if bucket is None else bucket] += 1
    labels = [label for label, _ in reports._latency([1.0]).histogram]
    histogram = [(label, counts[i]) for i, label in enumerate(labels)]

    def nearest_rank(share: float) -> float:
        return clamped[max(math.ceil(share * len(clamped)) - 1, 0)]

    return reports.Latency(len(clamped), nearest_rank(0.5), nearest_rank(0.9), histogram)


def timeline_one_time_at_a_time(times: list[float]) -> tuple[list[tuple[float, int]], float]:
    start, end = min(times), max(times)
    step = max((end - start) / reports.TIMELINE_BARS, 1.0)
    last = reports.TIMELINE_BARS - 1
    bars = Counter(min(int((t - start) // step), last) for t in times)
    return [(start + i * step, bars[i]) for i in range(reports.TIMELINE_BARS)], step


seconds = st.floats(min_value=-7200, max_value=3 * 86400, allow_nan=False, allow_infinity=False)
# Bucket bounds, zero and their neighbours are where an off-by-one would show.
edges = st.sampled_from([0.0, -0.0, *reports.LATENCY_BUCKETS, *(b - 1e-9 for b in reports.LATENCY_BUCKETS)])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(seconds, edges), min_size=1, max_size=400))
def test_latency_figures_are_those_of_one_value_at_a_time(values):
    assert reports._latency(list(values)) == latency_one_value_at_a_time(values)


@settings(max_examples=300, deadline=None)
@given(
    st.floats(min_value=1.6e9, max_value=1.9e9, allow_nan=False),
    st.lists(
        st.one_of(st.floats(min_value=0, max_value=200_000, allow_nan=False), st.integers(0, 60).map(float)),
        min_size=1,
        max_size=400,
    ),
)
def test_the_timeline_is_that_of_one_time_at_a_time(first, offsets):
    times = [first + offset for offset in offsets]
    assert reports._timeline(list(times)) == timeline_one_time_at_a_time(times)


def test_the_last_delivery_is_in_the_last_bar_and_every_delivery_in_one():
    times = [1.7e9 + i for i in range(0, 3001, 10)]
    bars, step = reports._timeline(list(times))
    assert sum(count for _, count in bars) == len(times) and bars[-1][1] >= 1 and step == 100.0
