"""Prometheus text exposition written directly, for the families with a series per model.

prometheus-client builds a Sample tuple and a label dict per series and formats each label at
every scrape: at 10,000 models (160,000 series) one scrape cost 1.1 CPU-s. A `TextCollector`
writes its lines itself, each model's label set escaped once and remembered, which is about a
tenth of that. `collect()` parses the same text back, so registry readers (`get_sample_value`,
tests) see exactly what Prometheus scrapes, from one piece of code.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


def escape(value: str) -> str:
    """A label value as the text format writes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


@functools.lru_cache(maxsize=1 << 16)
def labels(*pairs: tuple[str, str]) -> str:
    """`k1="v1",k2="v2"`, remembered: a model's label set is written at every scrape. Callers
    give (and join) labels in name order, as prometheus-client writes them, so what greps the
    text for a series finds it either way."""
    return ",".join(f'{k}="{escape(v)}"' for k, v in pairs)


ONE, ZERO = floatToGoString(1), floatToGoString(0)


@dataclass
class Family:
    """One metric family's lines. A counter's series are named `<name>_total`, as
    prometheus-client writes them."""

    name: str
    documentation: str
    kind: str = "gauge"  # gauge | counter
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.series = f"{self.name}_total" if self.kind == "counter" else self.name

    def add(self, label_text: str, value: float) -> None:
        text = ONE if value == 1 else ZERO if value == 0 else floatToGoString(value)
        self.lines.append(
            f"{self.series}{{{label_text}}} {text}\n" if label_text else f"{self.series} {text}\n"
        )

    def text(self) -> str:
        doc = self.documentation.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {self.series} {doc}\n# TYPE {self.series} {self.kind}\n" + "".join(self.lines)


class TextCollector(Collector):
    """A collector that writes its exposition text (`families`); `collect` reads it back."""

    def families(self) -> Iterable[Family]:
        raise NotImplementedError

    def text(self) -> str:
        return "".join(f.text() for f in self.families())

    def collect(self) -> Iterator:
        yield from text_string_to_metric_families(self.text())


class _One:
    """One plain collector, in the shape `generate_latest` reads."""

    def __init__(self, collector: Collector):
        self.collector = collector

    def collect(self) -> Iterable:
        return self.collector.collect()


class Registry(CollectorRegistry):
    """A registry whose `exposition` lets each TextCollector write its own text."""

    def __init__(self) -> None:
        super().__init__()
        self._order: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self._order.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self._order.remove(collector)

    def exposition(self) -> bytes:
        """The text format, as `generate_latest(self)` gives it (series in another order)."""
        return b"".join(
            c.text().encode() if isinstance(c, TextCollector) else generate_latest(_One(c))
            for c in self._order
        )
