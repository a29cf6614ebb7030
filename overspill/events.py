"""What the xDS server reports, turned into the control plane's counters and models' status."""

from __future__ import annotations

import collections
import contextlib

from api.status import EnvoyRejection
from metrics.instruments import Instruments
from reconciler.controller import Controller
from xds.server import Callbacks
from xds.stream import Stream
from xds.subscription import Ack, Nack
from xds.types import PUSH_ORDER, SHORT


class XdsEvents(Callbacks):
    def __init__(self, instruments: Instruments, controller: Controller):
        self.instruments = instruments
        self.controller = controller
        # Called for every response and ACK of every Envoy: the labelled children are looked up once.
        self._pushes = {t: instruments.xds_pushes.labels(SHORT[t]) for t in PUSH_ORDER}
        self._bytes = {t: instruments.xds_bytes.labels(SHORT[t]) for t in PUSH_ORDER}
        self._acks = {t: instruments.xds_acks.labels(SHORT[t]) for t in PUSH_ORDER}
        # Made at zero: a dashboard's increase() then sees an Envoy's first NACK, not only its second.
        self._nacks = {t: instruments.xds_nacks.labels(SHORT[t]) for t in PUSH_ORDER}
        self._push_to_ack = {t: instruments.xds_push_to_ack.labels(SHORT[t]) for t in PUSH_ORDER}
        self._without_layers: dict[int, str] = {}  # stream id -> node cluster, of streams in the gauge
        self._connected: dict[int, tuple[str, str]] = {}  # stream id -> (scope, protocol), in the gauge
        self._per_scope: collections.Counter[tuple[str, str]] = collections.Counter()

    def stream_opened(self, stream: Stream) -> None:
        self.instruments.xds_streams.inc()

    def stream_scoped(self, stream: Stream) -> None:
        labels = self._connected[stream.sid] = (str(stream.scope), stream.protocol.name)
        self._per_scope[labels] += 1
        self.instruments.xds_connected.labels(*labels).inc()

    def stream_closed(self, stream: Stream) -> None:
        self.instruments.xds_streams.dec()
        labels = self._connected.pop(stream.sid, None)
        if labels is not None:
            self._per_scope[labels] -= 1
            if self._per_scope[labels]:
                self.instruments.xds_connected.labels(*labels).dec()
            else:  # a scope with no Envoy left has no series
                del self._per_scope[labels]
                self.instruments.xds_connected.remove(*labels)
        self._count_without_layers(stream, False)
        self.controller.envoy_accepted(stream.sid)  # its NACKs go with it

    def response_sent(self, stream: Stream, type_url: str, size: int) -> None:
        self._pushes[type_url].inc()
        self._bytes[type_url].inc(size)

    def acked(self, stream: Stream, ack: Ack) -> None:
        self._acks[ack.type_url].inc()
        self._push_to_ack[ack.type_url].observe(ack.seconds)
        for seconds, models in ack.weights:
            self.instruments.decision_to_ack.observe(seconds, models)
        self.controller.envoy_accepted(stream.sid, SHORT[ack.type_url])

    def weight_layers(self, stream: Stream) -> None:
        self._count_without_layers(stream, stream.weight_layers is False)

    def _count_without_layers(self, stream: Stream, counted: bool) -> None:
        """Count the stream in the gauge of streams without weight layers, or not; a node cluster
        with none left has no series."""
        if counted == (stream.sid in self._without_layers):
            return
        if counted:
            self._without_layers[stream.sid] = stream.cluster
        else:
            del self._without_layers[stream.sid]
        n = sum(1 for c in self._without_layers.values() if c == stream.cluster)
        if n:
            self.instruments.xds_without_weight_layers.labels(stream.cluster).set(n)
        else:
            with contextlib.suppress(KeyError):
                self.instruments.xds_without_weight_layers.remove(stream.cluster)

    def request_refused(self, stream: Stream, error: str) -> None:
        self.instruments.xds_refused.inc()

    def nacked(self, stream: Stream, nack: Nack) -> None:
        short = SHORT[nack.type_url]
        self._nacks[nack.type_url].inc()
        rejection = EnvoyRejection(stream.node_id or stream.peer, short, nack.version, nack.message)
        self.controller.envoy_rejected(stream.sid, rejection, nack.models)

    def scope_denied(self, stream: Stream) -> None:
        self.instruments.xds_scope_denied.inc()
