"""Prometheus metrics of the gossip layer (`NetworkDB` over SWIM), read at scrape time.

Off unless swarmd was given `--metrics-addr` (`prometheus_client` is imported only in `enable`). A
node's gossip starts with its first dispatcher session (it needs the cluster's gossip keys), so
until then, and on a node whose gossip has stopped, these gauges have no sample:

- `shoal_gossip_members{state}` (gauge): gossip members this node knows, by SWIM state
  (alive, suspect, dead, left), itself included;
- `shoal_gossip_table_entries{table}` (gauge): live entries of each network table this node holds
  (e.g. `endpoint_table`: one per task endpoint on the overlay networks this node is attached to);
- `shoal_gossip_networks` (gauge): overlay networks this node takes part in through gossip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from shoal.netdriver.swim import STATE_NAMES

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from shoal.netdriver.networkdb import NetworkDB


class GossipCollector:
    """The gossip gauges of the live `NetworkDB` that `db()` returns (None: no gossip running)."""

    def __init__(self, db: Callable[[], NetworkDB | None]) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        members = GaugeMetricFamily("shoal_gossip_members", "Gossip members this node knows, by SWIM state.",
                                    labels=["state"])
        tables = GaugeMetricFamily("shoal_gossip_table_entries",
                                   "Live entries of each gossip network table this node holds.", labels=["table"])
        networks = GaugeMetricFamily("shoal_gossip_networks", "Overlay networks this node takes part in by gossip.")
        db = self.db()
        if db is not None:
            counts = dict.fromkeys(STATE_NAMES.values(), 0)
            for m in db.members():
                counts[m.state_name] += 1
            for state, n in counts.items():
                members.add_metric([state], float(n))
            for table, n in sorted(db.table_sizes().items()):
                tables.add_metric([table], float(n))
            networks.add_metric([], float(len(db.networks())))
        yield from (members, tables, networks)


def enable(registry: CollectorRegistry, db: Callable[[], NetworkDB | None]) -> GossipCollector:
    """Register the gossip gauges in `registry`."""
    collector = GossipCollector(db)
    registry.register(collector)
    return collector
