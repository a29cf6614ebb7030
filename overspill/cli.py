"""The `overspill` command: serve, validate, render, status, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from api.crd import InvalidObject, RemoteBackend, parse_remote_backend
from overspill.settings import DEFAULTS, Settings
from reconciler.documents import DEPTH_CEILING, Limits, parse_file

REMOTE_URL_QUERY = ("country", "continent", "location", "flavor")


def _remote_url(text: str) -> RemoteBackend:
    """`--default-remote https://host[:port][/prefix][?country=..&continent=..&location=..&flavor=type/name]`
    as a remoteBackend; the query says where it is and what it runs, for the models' Policies."""
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise argparse.ArgumentTypeError(f"want http(s)://host[:port][/path], got {text!r}")
    query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(REMOTE_URL_QUERY))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown query {', '.join(unknown)}: want {', '.join(REMOTE_URL_QUERY)}"
        )
    raw: dict = {"host": url.netloc, "scheme": url.scheme, "pathPrefix": url.path}
    where = {k: query[k] for k in ("country", "continent") if k in query}
    if "location" in query:
        where["name"] = query["location"]
    if where:
        raw["location"] = where
    if "flavor" in query:
        kind, _, name = query["flavor"].partition("/")
        raw["flavor"] = {"type": kind or None, "name": name or None}
    try:
        return parse_remote_backend(raw, "--default-remote")
    except InvalidObject as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="overspill",
        description="Envoy control plane that offloads burst traffic of model-inference services "
        "to a standby copy when an offloading metric crosses its threshold.",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO); logs are one key=value line per event on stderr",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the control plane",
        description=(
            "Run the control plane: watch the manifests directory (or the Kubernetes API), read offloading "
            "metrics, decide per model how much traffic spills over, and serve Envoy over gRPC ADS."
        ),
    )
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--manifests",
        type=Path,
        metavar="DIR",
        help="directory of YAML: ModelDeployments, Policies, Services, EndpointSlices, Deployments",
    )
    source.add_argument(
        "--kubernetes",
        action="store_true",
        help="watch the Kubernetes API instead (in-cluster config, or --kubeconfig/--context); metrics "
        "from metrics.k8s.io, custom.metrics.k8s.io and external.metrics.k8s.io; status written on the CRs",
    )
    s.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="with --manifests: keep each model's offload state (phase, delay and buffer timers) in "
        "DIR/offload-state.json, so a restart resumes it instead of starting all local; in Kubernetes "
        "mode it is kept on each ModelDeployment's status",
    )
    k = s.add_argument_group("Kubernetes mode")
    k.add_argument(
        "--kubeconfig", metavar="FILE", help="kubeconfig file (default: in-cluster, else ~/.kube/config)"
    )
    k.add_argument("--context", help="kubeconfig context (default: the current one)")
    k.add_argument(
        "--namespace",
        dest="namespaces",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable; default: all namespaces)",
    )
    k.add_argument(
        "--leader-elect",
        action="store_true",
        help="run several replicas: one (holding a coordination.k8s.io Lease) decides and writes status, "
        "all serve xDS",
    )
    k.add_argument("--lease-name", default=DEFAULTS.lease_name, help="the Lease's name (default %(default)s)")
    k.add_argument(
        "--lease-namespace",
        metavar="NS",
        help="the Lease's namespace (default: $POD_NAMESPACE, else overspill-system)",
    )
    k.add_argument(
        "--lease-seconds",
        type=_positive,
        default=DEFAULTS.lease_seconds,
        metavar="SECONDS",
        help="how long a lease lasts unrenewed before another replica takes over (default %(default)s)",
    )
    k.add_argument(
        "--identity", help="this replica's name in the Lease (default: $POD_NAME, else the host name)"
    )
    s.add_argument(
        "--xds-port",
        type=int,
        default=DEFAULTS.xds_port,
        help="gRPC ADS port Envoy connects to (default %(default)s)",
    )
    s.add_argument(
        "--xds-address",
        default=DEFAULTS.xds_address,
        help="address the ADS server binds (default %(default)s)",
    )
    t = s.add_argument_group(
        "xDS security",
        "TLS on the ADS port; with --xds-client-ca, mTLS: a node's client certificate bounds the "
        "namespaces it receives (SPIFFE ID spiffe://TD/ns/NS/..., or DNS name NAME.NS.svc[.DOMAIN]). "
        "The files are re-read when they change: new connections get the new certificate.",
    )
    t.add_argument("--xds-tls-cert", type=Path, metavar="FILE", help="server certificate chain (PEM)")
    t.add_argument("--xds-tls-key", type=Path, metavar="FILE", help="server private key (PEM)")
    t.add_argument(
        "--xds-client-ca",
        type=Path,
        metavar="FILE",
        help="CA certificates (PEM) client certificates must chain to; a client without one is refused",
    )
    t.add_argument(
        "--xds-gateway-identity",
        dest="xds_gateway_identities",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a client certificate with a URI or DNS SAN matching this glob receives every model, as "
        "an edge gateway (repeatable; e.g. spiffe://cluster.local/ns/overspill-system/sa/overspill-gateway)",
    )
    s.add_argument(
        "--listener-port",
        type=int,
        default=DEFAULTS.listener_port,
        help="port of the HTTP listener served to Envoy, where clients call models (default %(default)s)",
    )
    s.add_argument(
        "--listener-address",
        default=DEFAULTS.listener_address,
        help="address of that Envoy listener (default %(default)s)",
    )
    s.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULTS.metrics_port,
        help="port for /metrics, /status and /healthz (default %(default)s)",
    )
    s.add_argument(
        "--metrics-address",
        default=DEFAULTS.metrics_address,
        help="address for the metrics port (default %(default)s)",
    )
    s.add_argument(
        "--prometheus-url",
        metavar="URL",
        help="Prometheus to read External/Object/Pods offloading metrics from (PromQL)",
    )
    s.add_argument(
        "--evaluation-interval",
        type=_positive,
        default=DEFAULTS.evaluation_interval,
        metavar="SECONDS",
        help="how often offloading metrics are read and decisions made (default %(default)s)",
    )
    s.add_argument(
        "--load-report-interval",
        type=_positive,
        default=DEFAULTS.load_report_interval,
        metavar="SECONDS",
        help="how often Envoys send their load reports (LRS), read by envoy: offloading metrics "
        "(default %(default)s)",
    )
    s.add_argument(
        "--default-remote",
        type=_remote_url,
        metavar="URL",
        help="remote backend (http(s)://host[:port][/prefix]) for models whose offloadingConfig "
        "names no remoteBackend(s); for Policies, add where it is and what it runs as "
        "?country=de&continent=eu&location=NAME&flavor=TYPE/NAME (each optional)",
    )
    s.add_argument(
        "--cluster-domain",
        default=DEFAULTS.cluster_domain,
        help="cluster DNS domain in Service host names (default %(default)s)",
    )

    _manifest_limits(s)

    v = sub.add_parser(
        "validate",
        help="check YAML files; print every error with its field path",
        description="Validate ModelDeployment and Policy documents (and the Kubernetes objects "
        "beside them). Exits 1 when any document is invalid.",
    )
    v.add_argument("files", nargs="+", type=Path, metavar="FILE")
    _manifest_limits(v)

    r = sub.add_parser(
        "render",
        help="print the Envoy resources for a manifests directory",
        description="Print the resources the control plane serves an unscoped Envoy for DIR, decoded "
        "from the very bytes `serve` sends (no live metrics: every model in Standby, or Outage without "
        "ready endpoints).",
    )
    r.add_argument("manifests", type=Path, metavar="DIR")
    r.add_argument(
        "--bootstrap",
        action="store_true",
        help="print a complete static Envoy bootstrap instead (accepted by envoy --mode validate)",
    )
    r.add_argument(
        "--listener-port",
        type=int,
        default=DEFAULTS.listener_port,
        help="listener port (default %(default)s)",
    )
    r.add_argument(
        "--listener-address", default=DEFAULTS.listener_address, help="listener address (default %(default)s)"
    )
    r.add_argument("--admin-port", type=int, default=9901, help="admin port in the bootstrap (default 9901)")
    r.add_argument("--format", choices=["yaml", "json"], default="yaml", help="output format (default yaml)")

    b = sub.add_parser(
        "bootstrap",
        help="print an Envoy bootstrap that takes its config from the control plane",
        description="Print an Envoy bootstrap (YAML) for an edge gateway or a sidecar fed over ADS. "
        "--namespaces and --match-labels scope which models the node receives.",
    )
    b.add_argument("--xds-host", default="127.0.0.1", help="control plane address (default 127.0.0.1)")
    b.add_argument(
        "--xds-port", type=int, default=DEFAULTS.xds_port, help="control plane ADS port (default %(default)s)"
    )
    b.add_argument("--node-id", default="overspill-gateway", help="node.id (default overspill-gateway)")
    b.add_argument(
        "--node-cluster", default="overspill-gateway", help="node.cluster (default overspill-gateway)"
    )
    b.add_argument(
        "--admin-port", type=int, default=9901, help="Envoy admin port, on 127.0.0.1 (default 9901)"
    )
    b.add_argument(
        "--stats-port",
        type=int,
        metavar="PORT",
        help="also serve GET /stats/prometheus (and nothing else of the admin) on this port on every "
        "address, for a Prometheus outside the pod (the install's gateway uses 15090)",
    )
    protocol = b.add_mutually_exclusive_group()
    protocol.add_argument(
        "--sotw",
        dest="delta",
        action="store_false",
        help="use state-of-the-world xDS (GRPC): every Envoy is sent every cluster and route scope"
        " again on each structural change (8 MiB per new model at 10,000 models)",
    )
    protocol.add_argument(
        "--delta",
        dest="delta",
        action="store_true",
        help="use Delta xDS (DELTA_GRPC), the default: a change sends only what changed",
    )
    b.set_defaults(delta=True)
    b.add_argument(
        "--namespaces",
        default="",
        metavar="NS[,NS...]",
        help="only models in these namespaces (e.g. a sidecar's own)",
    )
    b.add_argument(
        "--listener-port",
        type=int,
        metavar="PORT",
        help="this node's own listener port (e.g. a sidecar beside a gateway)",
    )
    b.add_argument(
        "--match-labels", default="", metavar="K=V[,K=V...]", help="only ModelDeployments with these labels"
    )
    bt = b.add_argument_group("xDS over TLS", "file paths as Envoy sees them (not read here)")
    bt.add_argument(
        "--xds-ca", metavar="FILE", help="connect over TLS, trusting this CA (PEM) for the control plane"
    )
    bt.add_argument("--xds-client-cert", metavar="FILE", help="client certificate to present (mTLS)")
    bt.add_argument("--xds-client-key", metavar="FILE", help="the client certificate's key (mTLS)")
    bt.add_argument(
        "--xds-server-name",
        metavar="NAME",
        help="name the control plane's certificate must carry, as a DNS SAN (also sent as SNI) or an "
        "IP address SAN (default: --xds-host)",
    )

    st = sub.add_parser(
        "status",
        help="ask a running control plane for models and connected Envoys",
        description="Print per model its state, remote %% and metric values, and per connected "
        "Envoy the versions ACKed per type and any NACK.",
    )
    st.add_argument(
        "--url",
        default=f"http://127.0.0.1:{DEFAULTS.metrics_port}",
        help="the control plane's metrics address (default %(default)s)",
    )
    st.add_argument("--json", action="store_true", help="print the raw status document")

    g = sub.add_parser(
        "dashboard",
        help="print the Grafana dashboard (JSON) for the control plane's and Envoy's metrics",
        description="Print the Grafana dashboard that manifests/grafana/overspill-dashboard.json holds: "
        "fleet, per-model and control-plane rows over a Prometheus datasource chosen by its variable.",
    )
    g.add_argument("--out", type=Path, metavar="FILE", help="write it to FILE instead of standard output")

    d = sub.add_parser(
        "demo",
        help="run the end-to-end demo (Prometheus, Envoy, model servers, a burst)",
        description="Start Prometheus, two simulated model servers, the control plane and a real "
        "Envoy, send a traffic burst, and show offloading switch on and off.",
    )
    d.add_argument("--out", type=Path, default=Path("out/demo"), help="where the timeline PNG and CSV go")
    d.add_argument(
        "--scenario",
        choices=("burst", "long-burst"),
        default="burst",
        help="burst (default, ~1.5 min): a 20 s burst turns offloading on and off; long-burst (~3 min): a "
        "40 s burst, longer than the buffer, in Fixed and then Proportional mode, drawn side by side",
    )
    return p


def _manifest_limits(p: argparse.ArgumentParser) -> None:
    """What one manifest file may hold; past it the file (or document) is refused, naming it."""
    g = p.add_argument_group("manifest limits (a file or document past them is refused with the reason)")
    g.add_argument(
        "--max-manifest-bytes",
        type=_at_least(1),
        default=DEFAULTS.manifest_limits.max_bytes,
        metavar="BYTES",
        help="largest manifest file read (default %(default)s)",
    )
    g.add_argument(
        "--max-manifest-depth",
        type=_at_least(1, DEPTH_CEILING),
        default=DEFAULTS.manifest_limits.max_depth,
        metavar="LEVELS",
        help=f"deepest nesting of a document (default %(default)s, at most {DEPTH_CEILING})",
    )
    g.add_argument(
        "--max-manifest-alias-nodes",
        type=_at_least(0),
        default=DEFAULTS.manifest_limits.max_alias_nodes,
        metavar="NODES",
        help="nodes YAML aliases may add to a file when expanded, against alias bombs (default %(default)s)",
    )


def _at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be {low} or more" + (f" and {high} at most" if high is not None else "")
            )
        return value

    return parse


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(args.max_manifest_bytes, args.max_manifest_depth, args.max_manifest_alias_nodes)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    return {
        "serve": cmd_serve,
        "validate": cmd_validate,
        "render": cmd_render,
        "bootstrap": cmd_bootstrap,
        "status": cmd_status,
        "dashboard": cmd_dashboard,
        "demo": cmd_demo,
    }[args.command](args)


def cmd_serve(args: argparse.Namespace) -> int:
    from overspill.plane import STATE_DIR_KUBERNETES, ControlPlane

    if args.kubernetes and args.state_dir is not None:
        print(f"overspill serve: {STATE_DIR_KUBERNETES}", file=sys.stderr)
        return 2

    settings = Settings(
        manifests=args.manifests,
        state_dir=args.state_dir,
        xds_address=args.xds_address,
        xds_port=args.xds_port,
        xds_tls_cert=args.xds_tls_cert,
        xds_tls_key=args.xds_tls_key,
        xds_client_ca=args.xds_client_ca,
        xds_gateway_identities=args.xds_gateway_identities,
        listener_address=args.listener_address,
        listener_port=args.listener_port,
        metrics_address=args.metrics_address,
        metrics_port=args.metrics_port,
        prometheus_url=args.prometheus_url,
        evaluation_interval=args.evaluation_interval,
        load_report_interval=args.load_report_interval,
        default_remote=args.default_remote,
        cluster_domain=args.cluster_domain,
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespaces=args.namespaces,
        leader_elect=args.leader_elect,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        lease_seconds=args.lease_seconds,
        identity=args.identity,
        manifest_limits=_limits(args),
    )
    try:
        plane = ControlPlane(settings)
    except ValueError as exc:
        print(f"overspill serve: error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_until_signalled(plane.run()))
    return 0


async def _until_signalled(work) -> None:
    """Run until done or SIGTERM/SIGINT, then shut down cleanly (exit 0, as Kubernetes expects)."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        logging.getLogger("overspill").info("event=stopped")


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        objects, rejected = parse_file(path, _limits(args))
        for r in rejected:
            for err in r.errors:
                print(err if err.startswith(f"{path}: ") else f"{path}: {err}", file=sys.stderr)
        bad += len(rejected)
        for o in objects:
            print(f"{path}: {o.key.kind} {o.key}: valid")
    return 1 if bad else 0


def cmd_render(args: argparse.Namespace) -> int:
    from overspill.plane import ControlPlane
    from xds.render import served_documents, static_bootstrap
    from xds.scope import Scope

    if not args.manifests.is_dir():
        print(f"{args.manifests}: not a directory", file=sys.stderr)
        return 2
    plane = ControlPlane(
        Settings(args.manifests, listener_address=args.listener_address, listener_port=args.listener_port)
    )
    plane.load_once()
    for r in plane.store.rejected():
        for err in r.errors:
            print(f"warning: {err}", file=sys.stderr)
    for status in plane.controller.status.values():
        for err in status.errors:
            print(f"warning: {err}", file=sys.stderr)
    if args.bootstrap:
        routes = plane.controller.routes
        for r in routes:
            if r.remote is not None and r.remote.secret_refs():
                print(
                    f"warning: {r.namespace}/{r.name}: the remote's credentials are served over SDS only;"
                    " a static bootstrap does not carry them",
                    file=sys.stderr,
                )
        doc = static_bootstrap(routes, args.listener_address, args.listener_port, args.admin_port)
    else:
        doc = served_documents(plane.translator.cache.view(Scope()))
    if args.format == "json":
        print(json.dumps(doc, indent=2))
    else:
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from xds.render import ads_bootstrap

    labels = dict(kv.split("=", 1) for kv in args.match_labels.split(",") if "=" in kv)
    namespaces = [n for n in args.namespaces.split(",") if n]
    if (args.xds_client_cert is None) != (args.xds_client_key is None):
        print(
            "overspill bootstrap: error: --xds-client-cert and --xds-client-key go together", file=sys.stderr
        )
        return 2
    if (args.xds_client_cert or args.xds_server_name) and not args.xds_ca:
        print("overspill bootstrap: error: TLS flags need --xds-ca", file=sys.stderr)
        return 2
    doc = ads_bootstrap(
        args.xds_host,
        args.xds_port,
        args.node_id,
        args.node_cluster,
        args.admin_port,
        args.delta,
        namespaces,
        labels,
        listener_port=args.listener_port,
        tls_ca=args.xds_ca,
        tls_cert=args.xds_client_cert,
        tls_key=args.xds_client_key,
        tls_server_name=args.xds_server_name,
        stats_port=args.stats_port,
    )
    print(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120), end="")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(f"{args.url.rstrip('/')}/status", timeout=5) as resp:
            doc = json.load(resp)
    except OSError as exc:
        print(f"cannot reach the control plane at {args.url}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    leader = doc.get("leader")
    if leader is not None:  # Kubernetes mode with --leader-elect
        role = "leader" if leader["leading"] else f"follower (leader: {leader['holder'] or '-'})"
        print(f"this replica: {role}\n")
    print(f"{'MODEL':32} {'STATE':18} {'REMOTE%':>7} {'READY':>5}  METRICS")
    for key, m in doc["models"].items():
        metrics = (
            ", ".join(
                f"{x['name']}={'-' if x['value'] is None else round(x['value'], 3)}/{x['target']:g}"
                for x in m["metrics"]
            )
            or "-"
        )
        print(f"{key:32} {m['phase']:18} {m['remotePercent']:7g} {m['readyEndpoints']:5d}  {metrics}")
        for err in m["errors"]:
            print(f"  error: {err}")
        for warning in m.get("warnings", []):
            print(f"  warning: {warning}")
        policies = m.get("policies") or {}
        for r in policies.get("refused", []):
            print(f"  {r['reason']}: {r['message']}")
        if policies.get("enforcedRemotely"):
            print(f"  enforced by the remote: {', '.join(policies['enforcedRemotely'])}")
        if m["reason"]:
            print(f"  reason: {m['reason']}")
    for r in doc["rejected"]:
        for err in r["errors"]:
            print(f"rejected {r['origin']}: {err}")
    print()
    print(f"{'NODE':28} {'PROTOCOL':8} {'SCOPE':24} VERSIONS ACKED (* = response in flight)")
    for n in doc["nodes"]:
        versions = " ".join(
            f"{t}={v['acked'] or '-'}{'*' if v['pending'] else ''}" for t, v in sorted(n["types"].items())
        )
        print(f"{n['id']:28} {n['protocol']:8} {n['scope']:24} {versions}")
        if n.get("identity"):
            print(f"  identity {n['identity']}")
        for warning in n.get("warnings", []):
            print(f"  warning: {warning}")
        for t, v in sorted(n["types"].items()):
            if v["routeHeldSeconds"] is not None:
                print(f"  {t} update held {v['routeHeldSeconds']}s until its clusters are taken")
            if v["nack"]:
                models = ", ".join(v["nackModels"]) or "-"
                print(f"  NACK {t} version {v['nackVersion']} (models: {models}): {v['nack']}")
    load = doc.get("load") or {}
    if load.get("models"):
        print(f"\nENVOY LOAD REPORTS ({load['reporting_envoys']} Envoys)")
        print(f"{'MODEL':32} {'SIDE':6} {'IN FLIGHT':>9} {'REQ/S':>9} {'ERR/S':>7}  ORCA")
        for key, sides in load["models"].items():
            for side, x in sides.items():
                orca = ", ".join(f"{k}={v:g}" for k, v in x["orca"].items()) or "-"
                print(
                    f"{key:32} {side:6} {x['requests_in_flight']:9d} {x['request_rate']:9g} "
                    f"{x['errors']:7g}  {orca}"
                )
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from overspill.dashboard import render

    if args.out is None:
        sys.stdout.write(render())
    else:
        args.out.write_text(render())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from overspill.demo.long_burst import run_long_burst
    from overspill.demo.scenario import run_demo

    if args.log_level != "DEBUG":
        logging.getLogger("overspill.demo").setLevel(logging.WARNING)  # the per-second lines are the show
    if args.scenario == "long-burst":
        return asyncio.run(run_long_burst(args.out))
    return asyncio.run(run_demo(args.out))
