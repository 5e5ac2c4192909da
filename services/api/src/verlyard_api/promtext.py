"""Pure core: the API's own Prometheus metrics (request counts, a latency histogram, persister counters)
and the text exposition format (version 0.0.4) they and the scraped gauges are rendered in."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[tuple[str, str], ...]


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Family:
    """One metric family: its samples by label set."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[str, Labels, float]] = []

    def add(self, value: float, suffix: str = "", **labels: str) -> Family:
        self.samples.append((suffix, tuple(labels.items()), value))
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape(self.help)}", f"# TYPE {self.name} {self.kind}"]
        lines.extend(f"{self.name}{suffix}{_labels(labels)} {_number(value)}" for suffix, labels, value in self.samples)
        return "\n".join(lines)


def render(families: Iterable[Family]) -> str:
    return "\n".join(f.render() for f in families) + "\n"


class Histogram:
    """Cumulative-bucket histogram per label set (the Prometheus convention)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def observe(self, labels: Labels, value: float) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[labels] = self.sums.get(labels, 0.0) + value

    def family(self, name: str, help_text: str) -> Family:
        family = Family(name, "histogram", help_text)
        for labels in sorted(self.counts):
            counts = self.counts[labels]
            for bound, count in zip(self.buckets, counts, strict=False):
                family.samples.append(("_bucket", (*labels, ("le", _number(bound))), count))
            family.samples.append(("_bucket", (*labels, ("le", "+Inf")), counts[-1]))
            family.samples.append(("_sum", labels, self.sums[labels]))
            family.samples.append(("_count", labels, counts[-1]))
        return family


class OpsMetrics:
    """What this API process counts itself; the gauges read at scrape time are added by the route."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency = Histogram()
        self.telemetry: dict[tuple[str, str], int] = {}
        """(kind, outcome) -> count: metric points / log lines stored, duplicates, bad messages."""

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.observe((("method", method), ("route", route)), seconds)

    def count(self, kind: str, outcome: str, n: int = 1) -> None:
        if n:
            self.telemetry[(kind, outcome)] = self.telemetry.get((kind, outcome), 0) + n

    def families(self) -> list[Family]:
        requests = Family("verlyard_api_requests_total", "counter", "HTTP requests by route template and status")
        for (method, route, status), n in sorted(self.requests.items()):
            requests.add(n, method=method, route=route, status=status)
        telemetry = Family(
            "verlyard_api_telemetry_total", "counter", "Telemetry persisted from NATS (kind: metric|log), by outcome"
        )
        for (kind, outcome), n in sorted(self.telemetry.items()):
            telemetry.add(n, kind=kind, outcome=outcome)
        return [
            requests,
            self.latency.family("verlyard_api_request_duration_seconds", "HTTP request latency by route template"),
            telemetry,
        ]


def gauge(name: str, help_text: str, values: Mapping[str, float], label: str) -> Family:
    family = Family(name, "gauge", help_text)
    for key in sorted(values):
        family.add(values[key], **{label: key})
    return family
