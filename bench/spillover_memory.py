"""What spill-over costs a real Envoy in memory: N models, without it, with it, and with it to a
remote with a path prefix and a header (rewritten per attempt by a Lua filter of the model's
composite cluster, with a Lua state per worker thread).

    .venv/bin/python -m bench.spillover_memory --models 500 --concurrency 2

Each configuration is a static bootstrap (`overspill render --bootstrap` builds the same) run by
its own Envoy; the figure is Envoy's resident memory once it is ready.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from api.crd import RemoteBackend, Spillover
from api.desired import ModelRoute, service_domains
from overspill.demo.procs import ENVOY_HINT, find_binary, free_port
from xds.render import static_bootstrap

CONFIGS = {
    "off": (None, False),
    "spill-over, nothing to rewrite": (Spillover(enabled=True), False),
    "spill-over, path prefix and header": (Spillover(enabled=True), True),
}
READY_TIMEOUT = 120.0


def routes(n: int, spill: Spillover | None, rewrites: bool) -> list[ModelRoute]:
    remote = RemoteBackend("10.9.8.7", 8080, "http")
    if rewrites:
        remote = RemoteBackend("10.9.8.7", 8080, "http", "/v1", (("x-api-key", "k"),))
    return [
        ModelRoute(
            "ns",
            f"m{i}",
            service_domains(f"m{i}", "ns", 80),
            (("10.0.0.1", 80),),
            (remote,),
            0.0,
            spillover=spill,
        )
        for i in range(n)
    ]


def resident_mib(envoy: str, bootstrap: Path, admin_port: int, concurrency: int) -> float:
    argv = [envoy, "-c", str(bootstrap), "--use-dynamic-base-id", "--concurrency", str(concurrency)]
    proc = subprocess.Popen([*argv, "-l", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"envoy with {bootstrap} exited or was not ready in {READY_TIMEOUT:g}s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as resp:
                    if resp.read().strip() == b"LIVE":
                        break
            except OSError:
                pass
            time.sleep(0.2)
        time.sleep(1.0)  # workers finish their first config
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.spillover_memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models", type=int, default=500, help="models in each bootstrap")
    parser.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads")
    args = parser.parse_args(argv)
    envoy = find_binary("envoy", ENVOY_HINT, before=[Path(sys.executable).parent / "envoy"])
    base = None
    print(f"| {args.models} models, {args.concurrency} workers | Envoy RSS MiB | per model KiB over off |")
    print("|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (spill, rewrites) in CONFIGS.items():
            admin_port, path = free_port(), Path(tmp) / "bootstrap.yaml"
            doc = static_bootstrap(routes(args.models, spill, rewrites), "127.0.0.1", free_port(), admin_port)
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            mib = resident_mib(envoy, path, admin_port, args.concurrency)
            base = mib if base is None else base
            print(f"| {name} | {mib:.0f} | {1024 * (mib - base) / args.models:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
