"""Envoy load reports at fleet scale: M simulated Envoys report N models' clusters every interval.

`python -m bench.lrs_bench --models 10000 --envoys 1000` (bench/README.md, "Load reports"). Three
kinds of process, as in `bench.xds_bench`, so the control plane's CPU and memory are its own:

* the control plane (`--role server`): `LoadReports` on the xDS port (`start_server`) and the
  `envoy:` metric source reading every model once per evaluation interval, which also asks the
  Envoys for every model's two clusters (all N models read an `envoy:` metric: the worst case);
* fleets (`--role fleet`): `SimReporter`s (`overspill.sim.lrs`), each on its own connection,
  reporting like Envoy every asked cluster every interval, each busy on `--busy` random models;
* the coordinator: starts them, waits until every Envoy reports, then measures for `--seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from api.desired import cluster_name
from api.metric_spec import MetricSpec, MetricTarget
from bench.xds_bench import Child, Inbox, emit, memory_mib, reset_peak_memory
from metrics.envoy import EnvoyLoadMetrics
from metrics.source import MetricScope
from overspill.sim.lrs import Load, SimReporter
from xds.lrs import LoadReports
from xds.server import XdsServer, start_server
from xds.snapshot import Translator

NAMESPACES = 8


class LrsChild(Child):
    MODULE = "bench.lrs_bench"


def model(i: int) -> tuple[str, str]:
    return f"team-{i % NAMESPACES}", f"model-{i:05d}"


async def server_role(models: int, interval: float, evaluation: float) -> None:
    inbox = await Inbox().open()
    reports = LoadReports(interval)
    xds = XdsServer(Translator("127.0.0.1", 10000).cache)
    xds.services.append(reports.handler())
    server, port = await start_server(xds, "127.0.0.1", 0)
    source = EnvoyLoadMetrics(reports.load, reports.reporting, reports.ask)
    spec = MetricSpec("External", "envoy:requests_in_flight", MetricTarget("Value", 10))
    requests = [(spec, MetricScope(ns, "", name)) for ns, name in map(model, range(models))]
    read_seconds: list[float] = []

    async def evaluate() -> None:
        while True:
            started = time.perf_counter()
            await source.read_many(requests)
            read_seconds.append(time.perf_counter() - started)
            await asyncio.sleep(evaluation)

    evaluations = asyncio.create_task(evaluate())
    emit({"port": port})
    try:
        while (cmd := await inbox.get())["cmd"] != "stop":
            if cmd["cmd"] == "count":
                emit(
                    {
                        "reporting": reports.reporting(),
                        "reports": sum(r.reports for r in reports.reporters.values()),
                    }
                )
            elif cmd["cmd"] == "measure":
                reset_peak_memory()
                read_seconds.clear()
                before = sum(r.reports for r in reports.reporters.values())
                cpu, wall = time.process_time(), time.monotonic()
                await asyncio.sleep(cmd["seconds"])
                cpu, wall = time.process_time() - cpu, time.monotonic() - wall
                received = sum(r.reports for r in reports.reporters.values()) - before
                in_flight = sum(load.in_flight for load in reports.clusters().values())
                emit(
                    {
                        "cpu_per_second": cpu / wall,
                        "reports_per_second": received / wall,
                        "read_ms": 1000 * max(read_seconds, default=0.0),
                        "clusters_summed": len(reports.clusters()),
                        "in_flight_total": in_flight,
                        **memory_mib(),
                    }
                )
    finally:
        evaluations.cancel()
        await server.stop(None)


async def fleet_role(target: str, first: int, count: int, models: int, busy: int, seed: int) -> None:
    inbox = await Inbox().open()
    rng = random.Random(seed)
    envoys = []
    for i in range(first, first + count):
        loads = {
            cluster_name(*model(m), "local"): Load(in_flight=2, issued=10, succeeded=10)
            for m in rng.sample(range(models), busy)
        }
        envoy = SimReporter(target, f"envoy-{i}", lambda loads=loads: loads, static=True)
        await envoy.start()
        envoys.append(envoy)
    emit({"started": count})
    try:
        while (await inbox.get())["cmd"] != "stop":
            pass
    finally:
        for envoy in envoys:
            await envoy.close()


async def coordinate(args: argparse.Namespace) -> dict:
    common = ["--models", str(args.models), "--interval", str(args.interval)]
    server = await LrsChild.spawn("server", "--role", "server", *common)
    fleets: list[Child] = []
    try:
        port = (await server.recv(60))["port"]
        per = -(-args.envoys // args.fleets)
        for f in range(args.fleets):
            first, count = f * per, min(per, args.envoys - f * per)
            fleets.append(
                await LrsChild.spawn(
                    f"fleet-{f}", "--role", "fleet", *common, "--target", f"127.0.0.1:{port}",
                    "--first", str(first), "--count", str(count), "--busy", str(args.busy),
                )
            )  # fmt: skip
        for fleet in fleets:
            await fleet.recv(600)
        deadline = time.monotonic() + 120
        while (state := await server.ask({"cmd": "count"}))["reporting"] < args.envoys or state[
            "reports"
        ] < 2 * args.envoys:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every Envoy reports: {state}")
            await asyncio.sleep(1)
        await asyncio.sleep(2 * args.interval)  # every Envoy has the cluster set
        result = await server.ask({"cmd": "measure", "seconds": args.seconds}, timeout=args.seconds + 60)
        return {
            "models": args.models,
            "envoys": args.envoys,
            "busy_per_envoy": args.busy,
            "interval": args.interval,
            "expected_reports_per_second": args.envoys / args.interval,
            **result,
        }
    finally:
        for child in [*fleets, server]:
            await child.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=10_000, help="models, all reading an envoy: metric")
    p.add_argument("--envoys", type=int, default=1_000, help="simulated Envoys reporting")
    p.add_argument("--busy", type=int, default=10, help="models with traffic, per Envoy (random)")
    p.add_argument("--interval", type=float, default=1.0, help="load report interval, seconds")
    p.add_argument("--seconds", type=float, default=20.0, help="how long to measure")
    p.add_argument("--fleets", type=int, default=2, help="processes the Envoys are spread over")
    p.add_argument("--out", help="write the result as JSON here too")
    p.add_argument("--role", choices=["server", "fleet"], help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role == "server":
        asyncio.run(server_role(args.models, args.interval, evaluation=1.0))
    elif args.role == "fleet":
        asyncio.run(fleet_role(args.target, args.first, args.count, args.models, args.busy, seed=args.first))
    else:
        result = asyncio.run(coordinate(args))
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
