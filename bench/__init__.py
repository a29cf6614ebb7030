"""Benchmarks (`make bench`); not part of the distribution or of `make test`."""

import os

# grpc's C core logs every GOAWAY at info level when a thousand clients hang up; keep errors only.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
