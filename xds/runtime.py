"""Model weights as Envoy runtime values, sharded across a fixed set of RTDS layers.

RTDS layer names are fixed in the bootstrap and a layer is sent whole, so one layer holding
every model's weight would make each weight change cost O(models) bytes to every Envoy.
Each model's key hashes to one of `SHARDS` layers: a change resends one small layer. A layer
holds only the models offloading: a model at 0 % has no key, and its route's `default_value`
(0) applies, so a layer's bytes follow the models spilling over, not every model served.
"""

from __future__ import annotations

import zlib

from xds import wire

SHARDS = 64
LAYER_PREFIX = "overspill_weights_"


def layer_names(shards: int = SHARDS) -> list[str]:
    return [f"{LAYER_PREFIX}{i:03d}" for i in range(shards)]


def shard_of(runtime_key: str, shards: int = SHARDS) -> int:
    return zlib.crc32(runtime_key.encode()) % shards


def entry(runtime_key: str, percent: float) -> bytes:
    """The Struct entry setting a `runtime_fraction` key to `percent` %; none for 0 %.

    Envoy reads a whole number as a percentage out of 100 (9 bytes); a fraction needs the
    FractionalPercent struct (about 50 bytes), so it is used only when the percent has one.
    """
    if not percent:
        return b""
    if float(percent).is_integer():
        value = wire.fixed64_double(2, float(percent))
    else:
        value = wire.fractional_percent_value(round(percent * 10_000))
    return wire.struct_entry(runtime_key, value)
