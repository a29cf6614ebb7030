"""Several remotes per model: Envoy's own failover from one to the next, in the user's order.

The route still sends the remote share to the model's one remote cluster (`.../remote`); with
several remotes that cluster is an aggregate (`envoy.clusters.aggregate`) over one cluster per
remote (`.../remote/<i>`), in order, so remote i is priority i. One cluster per remote, not one
cluster with a priority per remote, because each remote has its own TLS (SNI, CA, verified
name) and a cluster has one transport socket.

Leaving a remote that fails is Envoy's, within a request or two, not the control plane's:
- a request that could not reach a remote (refused, reset before it was sent) is retried at once
  on the next priority (`previous_priorities` in the route's retry policy), so it is not lost;
- outlier detection ejects the remote after 2 such failures in a row (or 3 gateway errors, 502,
  503, 504), so the following requests go straight to the next remote; after `base_ejection_time`
  (longer each time it is ejected again) the remote gets requests again, so traffic returns to
  the preferred remote once it is back.
Outlier detection rather than active health checks: it costs the remotes nothing (a hosted
endpoint may bill or rate-limit probes, and has no health path we know), and the retry covers
the requests that find a remote down.

Host, path prefix and headers differ per remote, and Envoy picks the remote after the route's
rewrites are applied: the Host comes from the chosen endpoint's host name (`auto_host_rewrite`),
and the aggregate cluster's upstream filters (which run once the remote is chosen, on each
attempt) set the path prefix and headers of the remote the endpoint's metadata names. A header
that one remote sets is removed on the way to the others: one remote's API key never reaches
another. Headers from Secrets are injected there too, each remote's into internal names that
the script moves to the chosen remote's real ones (see `credentials.internal_header`); a client
certificate is a member cluster's own TLS context.
"""

from __future__ import annotations

import datetime

from api.crd import RemoteBackend
from api.desired import ModelRoute, remote_member_name
from xds import resources as res
from xds import wire
from xds.credentials import header_injectors, internal_header, member_credentials, remote_credentials
from xds.fields import Fields, duration, uint32

METADATA = "overspill"  # the endpoint metadata namespace naming which remote an endpoint is
REMOTE_HEADER = "x-overspill-remote"  # from the metadata to the script; never leaves Envoy
# Seconds, not the minute of Envoy's defaults: a remote that fails is left after a request or
# two, and tried again 5 s later (10 s, 15 s ... after further ejections, up to a minute).
# Other 5xx answers eject after Envoy's default of 5 in a row (`consecutive_5xx` is left unset:
# betterproto2 spells its JSON name wrong, and `overspill render` prints JSON).
_CLUSTER = Fields("envoy.config.cluster.v3.Cluster")
_OUTLIER_DETECTION = Fields("envoy.config.cluster.v3.OutlierDetection")
BASE_EJECTION_TIME = datetime.timedelta(seconds=5)
_OUTLIER = _CLUSTER.outlier_detection(
    _OUTLIER_DETECTION.consecutive_gateway_failure(uint32(3))
    + _OUTLIER_DETECTION.enforcing_consecutive_gateway_failure(uint32(100))
    + _OUTLIER_DETECTION.split_external_local_origin_errors(True)
    + _OUTLIER_DETECTION.consecutive_local_origin_failure(uint32(2))
    + _OUTLIER_DETECTION.enforcing_consecutive_local_origin_failure(uint32(100))
    + _OUTLIER_DETECTION.interval(duration(datetime.timedelta(seconds=1)))
    + _OUTLIER_DETECTION.base_ejection_time(duration(BASE_EJECTION_TIME))
    + _OUTLIER_DETECTION.max_ejection_time(duration(datetime.timedelta(seconds=60)))
    + _OUTLIER_DETECTION.max_ejection_percent(uint32(100))
)
_CHOSEN = f"%UPSTREAM_METADATA({METADATA}:remote)%"  # the chosen endpoint's remote index

# Sets the path prefix and headers of the remote named by REMOTE_HEADER. The original path is kept
# in the request's dynamic metadata: a retry on the next remote starts from it, not from the
# path the previous attempt was given.
_SCRIPT = """local remotes = {%(remotes)s}
local names = {%(names)s}
%(internal)sfunction envoy_on_request(handle)
  local headers = handle:headers()
  local remote = remotes[headers:get("%(mark)s")]
  headers:remove("%(mark)s")
%(strip)s  if remote == nil then return end
  local saved = handle:streamInfo():dynamicMetadata()
  local kept = saved:get("%(metadata)s")
  local path = kept and kept["path"]
  if path == nil then
    path = headers:get(":path")
    saved:set("%(metadata)s", "path", path)
  end
  headers:replace(":path", remote[1] .. path)
  for _, name in ipairs(names) do
    local value = remote[2][name]
%(lookup)s    if value == nil then headers:remove(name) else headers:replace(name, value) end
  end
end
"""
# With credentials from Secrets: the injectors wrote every remote's into its internal headers
# (`credentials.internal_header`); all of them are taken off every attempt, and the chosen
# remote's moved to their real names (remote[3]: real name -> internal name).
_INTERNAL = "local internal = {%s}\n"
_STRIP = """  local injected = {}
  for _, name in ipairs(internal) do
    injected[name] = headers:get(name)
    headers:remove(name)
  end
"""
_LOOKUP = "    if remote[3][name] ~= nil then value = injected[remote[3][name]] end\n"


def remote_clusters(route: ModelRoute) -> list[tuple[str, bytes]]:
    """(name, Cluster) of the model's remote side: its one remote's cluster, or for several one
    cluster per remote then the aggregate over them (the route's cluster)."""
    if len(route.remotes) <= 1:
        if route.remote is None:
            return []
        if route.spillover is None:
            return [
                (
                    route.remote_cluster,
                    res.remote_cluster(route, remote_credentials(route.remote, route.remote_cluster)),
                )
            ]
        # Spill-over (`xds.spillover`) rewrites a retry by the chosen endpoint, as below; the
        # weighted share still names this cluster, so it keeps its own credentials too.
        name, remote = route.remote_cluster, route.remote
        creds = remote_credentials(remote, name)
        return [(name, res.backend_cluster(name, remote, remote.authority, _tag(0), creds))]
    members = list(zip(remote_names(route), route.remotes, strict=True))
    return [(name, member_cluster(name, i, remote)) for i, (name, remote) in enumerate(members)] + [
        (route.remote_cluster, aggregate_cluster(route, [name for name, _ in members]))
    ]


def remote_names(route: ModelRoute) -> list[str]:
    """The cluster of each of the model's remotes, in order (the one remote's is the remote
    cluster itself); a remote's secrets are named after it."""
    if len(route.remotes) <= 1:
        return [route.remote_cluster] if route.remote is not None else []
    return [remote_member_name(route.namespace, route.name, i) for i in range(len(route.remotes))]


def member_cluster(name: str, index: int, remote: RemoteBackend) -> bytes:
    """One remote: its endpoint named by its Host value and tagged with its index, and its
    client certificate."""
    creds = member_credentials(remote, name)
    return res.backend_cluster(name, remote, remote.authority, _tag(index), creds) + _OUTLIER


def _tag(index: int) -> bytes:
    """An endpoint's metadata naming which of the model's remotes it is (encoded): the Struct
    {"remote": "<index>"} under METADATA in `filter_metadata`."""
    tag = wire.struct_entry("remote", wire.text(3, str(index)))  # Value.string_value
    return _METADATA.filter_metadata(wire.entry(METADATA, tag))


_METADATA = Fields("envoy.config.core.v3.Metadata")
_CUSTOM = Fields("envoy.config.cluster.v3.Cluster.CustomClusterType")
_AGGREGATE = Fields("envoy.extensions.clusters.aggregate.v3.ClusterConfig")


def aggregate_cluster(route: ModelRoute, members: list[str]) -> bytes:
    """The model's remote cluster: its remotes in order of preference, the first healthy one
    taking the requests."""
    config = b"".join(_AGGREGATE.clusters(m) for m in members)
    return custom_cluster(route.remote_cluster, "envoy.clusters.aggregate", _AGGREGATE.pack(config)) + (
        upstream_options(route)
    )


def custom_cluster(name: str, kind: str, config: bytes) -> bytes:
    """A cluster of clusters (an aggregate, a composite): `kind` with its config (an encoded
    `Any`) picks the cluster behind it for each request."""
    return (
        _CLUSTER.name(name)
        + _CLUSTER.connect_timeout(duration(res.CONNECT_TIMEOUT))
        + _CLUSTER.lb_policy("CLUSTER_PROVIDED")
        + _CLUSTER.cluster_type(_CUSTOM.name(kind) + _CUSTOM.typed_config(config))
    )


def upstream_options(route: ModelRoute) -> bytes:
    """The upstream filters that give each attempt the rewrites of the remote it is sent to (of
    an endpoint tagged with its index), as a Cluster field; an attempt to any other host goes as
    it came. Empty when no remote has a path prefix or a header."""
    script = lua_script(route.remotes)
    if script is None:
        return b""
    injectors = [
        f
        for i, (name, remote) in enumerate(zip(remote_names(route), route.remotes, strict=True))
        for f in header_injectors(remote, name, i)
    ]
    return res.upstream_filters([_MARK, *injectors, _lua_filter(script)])


_HEADER_OPTION, _HEADER = (
    Fields("envoy.config.core.v3.HeaderValueOption"),
    Fields("envoy.config.core.v3.HeaderValue"),
)
_MUTATION = Fields("envoy.config.common.mutation_rules.v3.HeaderMutation")
_MUTATIONS = Fields("envoy.extensions.filters.http.header_mutation.v3.Mutations")
_HEADER_MUTATION = Fields("envoy.extensions.filters.http.header_mutation.v3.HeaderMutation")
# The chosen remote's index, from its endpoint's metadata, into a header the script reads; each
# remote's headers from Secrets then go into its internal headers (overwriting any a client
# sent), which the script moves or removes.
_MARK = res.http_filter(
    "envoy.filters.http.header_mutation",
    _HEADER_MUTATION.pack(
        _HEADER_MUTATION.mutations(
            _MUTATIONS.request_mutations(
                _MUTATION.append(
                    _HEADER_OPTION.header(_HEADER.key(REMOTE_HEADER) + _HEADER.value(_CHOSEN))
                    + _HEADER_OPTION.append_action("OVERWRITE_IF_EXISTS_OR_ADD")
                )
            )
        )
    ),
)
_LUA, _DATA = Fields("envoy.extensions.filters.http.lua.v3.Lua"), Fields("envoy.config.core.v3.DataSource")


def _lua_filter(script: str) -> bytes:
    source = _LUA.default_source_code(_DATA.inline_string(script))
    return res.http_filter("envoy.filters.http.lua", _LUA.pack(source))


def lua_script(remotes: tuple[RemoteBackend, ...]) -> str | None:
    """The per-remote rewrites as a Lua table; None when no remote has a prefix, a header or a
    header from a Secret."""
    if not any(r.path_prefix or r.headers_to_add or r.secret_headers for r in remotes):
        return None
    secret = any(r.secret_headers for r in remotes)
    names = list(
        dict.fromkeys(
            [k.lower() for r in remotes for k, _ in r.headers_to_add]
            + [h.name.lower() for r in remotes for h in r.secret_headers]
        )
    )

    def entry(i: int, r: RemoteBackend) -> str:
        headers = ", ".join(f"[{_lua(k.lower())}] = {_lua(v)}" for k, v in r.headers_to_add)
        moved = ", ".join(
            f"[{_lua(h.name.lower())}] = {_lua(internal_header(i, h.name))}" for h in r.secret_headers
        )
        return f"[{_lua(str(i))}] = {{{_lua(r.path_prefix)}, {{{headers}}}" + (
            f", {{{moved}}}}}" if secret else "}"
        )

    internal = [internal_header(i, h.name) for i, r in enumerate(remotes) for h in r.secret_headers]
    return _SCRIPT % {
        "remotes": ", ".join(entry(i, r) for i, r in enumerate(remotes)),
        "names": ", ".join(_lua(n) for n in names),
        "internal": _INTERNAL % ", ".join(_lua(n) for n in internal) if secret else "",
        "mark": REMOTE_HEADER,
        "strip": _STRIP if secret else "",
        "metadata": METADATA,
        "lookup": _LOOKUP if secret else "",
    }


def _lua(text: str) -> str:
    """A Lua string literal of any text: every byte but letters and digits as a decimal escape."""
    return (
        '"' + "".join(chr(b) if chr(b).isalnum() and b < 128 else f"\\{b:03d}" for b in text.encode()) + '"'
    )
