"""What the xDS server reports, turned into the control plane's counters and models' status."""

from __future__ import annotations

from api.status import EnvoyRejection
from metrics.instruments import Instruments
from reconciler.controller import Controller
from xds.server import Callbacks
from xds.stream import Stream
from xds.subscription import Nack
from xds.types import PUSH_ORDER, SHORT


class XdsEvents(Callbacks):
    def __init__(self, instruments: Instruments, controller: Controller):
        self.instruments = instruments
        self.controller = controller
        # Called for every response and ACK of every Envoy: the labelled children are looked up once.
        self._pushes = {t: instruments.xds_pushes.labels(SHORT[t]) for t in PUSH_ORDER}
        self._bytes = {t: instruments.xds_bytes.labels(SHORT[t]) for t in PUSH_ORDER}
        self._acks = {t: instruments.xds_acks.labels(SHORT[t]) for t in PUSH_ORDER}

    def stream_opened(self, stream: Stream) -> None:
        self.instruments.xds_streams.inc()

    def stream_closed(self, stream: Stream) -> None:
        self.instruments.xds_streams.dec()
        self.controller.envoy_accepted(stream.sid)  # its NACKs go with it

    def response_sent(self, stream: Stream, type_url: str, size: int) -> None:
        self._pushes[type_url].inc()
        self._bytes[type_url].inc(size)

    def acked(self, stream: Stream, type_url: str) -> None:
        self._acks[type_url].inc()
        self.controller.envoy_accepted(stream.sid, SHORT[type_url])

    def request_refused(self, stream: Stream, error: str) -> None:
        self.instruments.xds_refused.inc()

    def nacked(self, stream: Stream, nack: Nack) -> None:
        short = SHORT[nack.type_url]
        self.instruments.xds_nacks.labels(short).inc()
        rejection = EnvoyRejection(stream.node_id or stream.peer, short, nack.version, nack.message)
        self.controller.envoy_rejected(stream.sid, rejection, nack.models)
