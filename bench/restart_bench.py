"""`python -m bench.restart_bench`: M simulated Envoys reconnecting at once to a restarted control plane.

The control plane (`--role server`: `Translator` + `XdsServer` on a fixed port, N synthetic models,
every fourth at 50 % remote as a burst would have it) serves M `SimEnvoy`s in fleet processes
(`bench.xds_bench`'s fleets, here with a `reconnect` command). Once every node holds everything,
the server is SIGKILLed; after `--away` seconds a new server process starts on the same port with
the same models and weights (what a restart with the offload state restored decides first), and
every node reconnects at once, as it was: SotW naming its last versions, Delta listing what it
holds (`initial_resource_versions`).

Printed per protocol: the restart (until the new process serves), the reconnect (from the moment the
nodes start reconnecting until every node holds the whole state with its old weights, and until the
server has every stream answered), weights that moved on any node (should be 0), bytes resent per
node, and the new server's memory: RSS once started, peak (VmHWM) once all are in sync.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.xds_bench import (
    Child,
    Inbox,
    emit,
    holds,
    join_all,
    machine,
    memory_mib,
    poll,
    say,
    synthetic_models,
)
from overspill.demo.procs import free_port
from overspill.sim import envoy as sim
from overspill.sim.envoy import SimEnvoy
from xds import runtime
from xds.server import XdsServer, start_server
from xds.snapshot import Translator
from xds.types import PUSH_ORDER, SECRET

MODULE = "bench.restart_bench"
WANTED = tuple(t for t in PUSH_ORDER if t != SECRET)  # no model has credentials: no node asks for secrets


# --- the control plane process ------------------------------------------------------------------


def in_sync(xds: XdsServer, count: int) -> bool:
    """`count` streams, each subscribed to every type it wants, none waiting for an answer, and each answered
    (or found to need nothing) at the view's current version of every type."""
    if len(xds.streams) != count:
        return False
    for stream in xds.streams.values():
        view = stream.view
        if view is None or set(stream.types) != set(WANTED):
            return False
        for type_url, sub in stream.types.items():
            if sub.pending or sub.settled_version != view.version_of(type_url):
                return False
    return True


async def server_role(models: int, port: int, forgetful: bool = False) -> None:
    t0, c0 = time.monotonic(), time.process_time()
    share = 0.0 if forgetful else 50.0  # forgetful: the first decision of a restart with nothing saved
    routes = [
        replace(r, remote_percent=share if i % 4 == 0 else 0.0)
        for i, r in enumerate(synthetic_models(models))
    ]
    translator = Translator("0.0.0.0", 10000)
    translator.publish(routes)
    xds = XdsServer(translator.cache)
    server, port = await start_server(xds, "127.0.0.1", port)
    inbox = await Inbox().open()
    emit({"event": "ready", "port": port, "seconds": time.monotonic() - t0, "cpu": time.process_time() - c0,
          **memory_mib()})  # fmt: skip
    try:
        while (cmd := await inbox.get())["cmd"] != "stop":
            if cmd["cmd"] == "in_sync":
                t1, c1 = time.monotonic(), time.process_time()
                await poll(lambda: in_sync(xds, cmd["count"]), cmd["timeout"], 0.01)
                done = in_sync(xds, cmd["count"])
                emit({"in_sync": done, "seconds": time.monotonic() - t1, "cpu": time.process_time() - c1,
                      "streams": len(xds.streams), **memory_mib()})  # fmt: skip
            elif cmd["cmd"] == "stats":
                emit({"streams": len(xds.streams), **memory_mib()})
    finally:
        await server.stop(None)


# --- the fleets ---------------------------------------------------------------------------------


async def fleet_role(target: str, delta: bool, count: int, models: int, prefix: str, parallel: int) -> None:
    """`count` nodes join (at most `parallel` pulling the whole state at once); on `reconnect`, once
    their server is gone, all come back at once holding what they held."""
    layers = tuple(runtime.layer_names())
    # Delta nodes keep their resource versions: they are what a reconnecting Envoy names.
    envoys = [
        SimEnvoy(target, node_id=f"{prefix}-{i}", delta=delta, record=delta, layers=layers)
        for i in range(count)
    ]
    inbox = await Inbox().open()
    try:
        t0 = time.monotonic()
        await join_all(envoys, models, parallel)
        emit({"event": "synced", "seconds": time.monotonic() - t0})
        while (cmd := await inbox.get())["cmd"] != "stop":
            assert cmd["cmd"] == "reconnect"
            envoys, report = await reconnect(envoys, target, delta, layers)
            emit({"event": "started"})
            assert (await inbox.get())["cmd"] == "report"  # once the server has every stream answered
            emit(report(models))
    finally:
        await asyncio.gather(*(e.stop() for e in envoys), return_exceptions=True)


async def reconnect(
    envoys: list[SimEnvoy], target: str, delta: bool, layers: tuple[str, ...]
) -> tuple[list[SimEnvoy], Callable[[int], dict]]:
    """Once the server is gone (every stream ended), every node comes back at once holding what it
    held. Returns the new nodes, and what to report once the server says all are in sync."""
    await poll(lambda: all(e.ended for e in envoys), 30, 0.01)
    ended = sum(1 for e in envoys if e.ended)
    moved = [0]

    def flip(key: str, value: float, at: float) -> None:
        moved[0] += 1  # a weight the node held took another value

    again = []
    for old in envoys:
        new = SimEnvoy(target, node_id=old.node_id, delta=delta, record=False, layers=layers, on_runtime=flip)
        new.reconnect_from(old)
        again.append(new)
    wanted = [old.runtime_values for old in envoys]
    await asyncio.gather(*(e.stop() for e in envoys), return_exceptions=True)
    c0 = time.process_time()
    await asyncio.gather(*(e.start() for e in again))  # all at once

    def report(models: int) -> dict:
        pairs = zip(again, wanted, strict=True)
        return {
            "held": sum(1 for e, w in pairs if holds(e, models) and e.runtime_values == w and not e.ended),
            "cpu": time.process_time() - c0,
            "ended": ended,
            "moved": moved[0],
            "bytes": sum(e.received_bytes for e in again),
            "failed": [e.ended for e in again if e.ended][:3],
        }

    return again, report


# --- the coordinator ----------------------------------------------------------------------------


@dataclass
class Restart:
    """One protocol's figures (seconds unless named otherwise)."""

    models: int
    clients: int
    protocol: str
    fleet_sync_s: float = math.nan  # the first connection, at most `parallel` nodes syncing at once
    rss_before_mib: float = math.nan  # the first server once all nodes held everything
    restart_s: float = math.nan  # the new process: spawned until it serves (Python's imports included)
    # Nodes told to reconnect -> the server has M streams, each answered at the current version of
    # every type (so each node holds the whole state, with the weights it had: checked after).
    reconnect_s: float = math.nan
    server_cpu_s: float = math.nan  # the new server's CPU for the reconnections
    weights_moved: int = 0  # weight values that changed on any node (0: nothing flipped)
    kib_resent_per_node: float = math.nan
    rss_started_mib: float = math.nan
    peak_rss_mib: float = math.nan  # the new server's VmHWM once all are in sync
    failed: int = 0  # nodes not in sync within the timeout, or not holding everything with old weights


async def spawn(name: str, *args: str) -> Child:
    return await Child.spawn(name, *args, module=MODULE)


async def run(protocol: str, args: argparse.Namespace) -> Restart:
    n, m = args.models, args.clients
    r = Restart(n, m, protocol)
    label = f"[N={n} M={m} {protocol}]"
    port = free_port()
    server = await spawn("server", "--role", "server", "--models", str(n), "--port", str(port))
    fleets: list[Child] = []
    try:
        ready = await server.recv(args.timeout)
        t0 = time.monotonic()
        procs = min(args.client_procs, m)
        for p in range(procs):
            count = m // procs + (p < m % procs)
            fleets.append(
                await spawn(
                    f"fleet-{p}",
                    *("--role", "fleet", "--target", f"127.0.0.1:{port}", "--protocol", protocol),
                    *("--count", str(count), "--models", str(n), "--prefix", f"{protocol}-{p}"),
                )
            )
        for f in fleets:
            await f.recv(args.timeout)
        r.fleet_sync_s = time.monotonic() - t0
        r.rss_before_mib = (await server.ask({"cmd": "stats"}))["rss_mib"]
        say(f"{label} {m} nodes synced in {r.fleet_sync_s:.1f} s; server RSS {r.rss_before_mib:.0f} MiB")

        os.kill(server.proc.pid, signal.SIGKILL)  # kill -9, mid-stream
        await server.proc.wait()
        await server.close()
        await asyncio.sleep(args.away)
        t0 = time.monotonic()
        again = ["--role", "server", "--models", str(n), "--port", str(port)]
        server = await spawn("server", *again, *(["--forgetful"] if args.forgetful else []))
        ready = await server.recv(args.timeout)
        r.restart_s, r.rss_started_mib = time.monotonic() - t0, ready["rss_mib"]
        t0 = time.monotonic()
        for f in fleets:
            f.send({"cmd": "reconnect"})
        server.send({"cmd": "in_sync", "count": m, "timeout": args.timeout})
        for f in fleets:
            await f.recv(args.timeout)  # every node has started its stream
        synced = await server.recv(args.timeout + 30)
        r.reconnect_s = time.monotonic() - t0
        for f in fleets:
            f.send({"cmd": "report"})
        seen = [await f.recv(args.timeout) for f in fleets]
        r.server_cpu_s, r.peak_rss_mib = synced["cpu"], synced["peak_rss_mib"]
        r.weights_moved = sum(s["moved"] for s in seen)
        r.kib_resent_per_node = sum(s["bytes"] for s in seen) / m / 1024
        r.failed = m - sum(s["held"] for s in seen) if synced["in_sync"] else m
        say(
            f"{label} kill -9; the new process serves {r.restart_s:.2f} s after its start "
            f"(RSS {r.rss_started_mib:.0f} MiB); {m} nodes reconnecting at once are all in sync "
            f"{r.reconnect_s:.2f} s later (server CPU {r.server_cpu_s:.2f} s, "
            f"peak RSS {r.peak_rss_mib:.0f} MiB); "
            f"weights moved: {r.weights_moved}; resent {r.kib_resent_per_node:.1f} KiB per node"
            + (f"; {r.failed} NOT IN SYNC or not holding their old weights" if r.failed else "")
        )
    finally:
        await asyncio.gather(*(f.close() for f in fleets))
        await server.close()
    return r


async def coordinate(args: argparse.Namespace) -> tuple[dict, list[Restart]]:
    protocols = ["sotw", "delta"] if args.protocol == "both" else [args.protocol]
    where = machine()
    forgetful = " (restarts forget the weights)" if args.forgetful else ""
    say(f"N={args.models} models, M={args.clients} nodes, {protocols}{forgetful}; {where}")
    sim.warm_up()
    results = [await run(protocol, args) for protocol in protocols]
    return where, results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.restart_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=100, help="N models (default %(default)s)")
    ap.add_argument("--clients", type=int, default=1000, help="M simulated Envoys (default %(default)s)")
    ap.add_argument("--protocol", choices=["sotw", "delta", "both"], default="both")
    ap.add_argument("--away", type=float, default=1.0, help="seconds without a control plane (default 1)")
    ap.add_argument("--client-procs", type=int, default=2, help="fleet processes (default 2)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds any one phase may take")
    ap.add_argument(
        "--forgetful",
        action="store_true",
        help="restart with no saved state: every weight back to 0 (what the restore prevents)",
    )
    ap.add_argument("--out", help="results as JSON")
    ap.add_argument("--role", choices=["server", "fleet"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default="fleet", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", type=int, default=50, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role == "server":
        asyncio.run(server_role(args.models, args.port, args.forgetful))
    elif args.role == "fleet":
        delta = args.protocol == "delta"
        asyncio.run(fleet_role(args.target, delta, args.count, args.models, args.prefix, args.parallel))
    else:
        try:
            where, results = asyncio.run(coordinate(args))
        finally:
            Child.kill_all()
        if args.out:
            doc = {"machine": where, "results": [asdict(r) for r in results]}
            Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
