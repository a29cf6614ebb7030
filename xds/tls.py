"""TLS for the xDS port: the server's certificate, and under mTLS the CA its clients' certificates
must chain to, re-read when the files change so that rotation needs no restart.

gRPC asks `ServerTls.fetch` for the certificate configuration before each new connection's
handshake (`grpc.dynamic_ssl_server_credentials`); it compares the files' stat signatures (a
few microseconds) and reads them only when they changed. A half-written or mismatched pair (a
rotation caught midway) is not taken: connections keep the last good configuration, and the
failure is logged once per change of the files. Connections already open keep theirs.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger("overspill.xds")


class TlsFileError(ValueError):
    """A certificate, key or CA file that cannot be used, naming the file and why."""


@dataclass
class ServerTls:
    """The server's certificate chain and key, and the client CA (mTLS: a client certificate
    chaining to it is required) as files."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    reloads: int = 0  # configurations taken after the first, for tests and the log
    _signature: tuple = field(default=(), repr=False)
    _failed: tuple = field(default=(), repr=False)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that re-read the files on change; raises `TlsFileError` if they
        cannot be used now."""
        self._signature = self._stat()
        initial = self._load()
        return grpc.dynamic_ssl_server_credentials(
            initial, self.fetch, require_client_authentication=self.mutual
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration if the files changed, else None."""
        try:
            signature = self._stat()
        except TlsFileError as exc:
            return self._failure(str(exc), (str(exc),))
        if signature == self._signature:
            return None
        try:
            config = self._load()
        except TlsFileError as exc:
            return self._failure(str(exc), signature)
        self._signature = signature
        self.reloads += 1
        log.info(
            "event=xds_tls_reloaded cert=%s client_ca=%s reloads=%d",
            self.cert,
            self.client_ca or "-",
            self.reloads,
        )
        return config

    def _failure(self, error: str, signature: tuple) -> None:
        if signature != self._failed:  # once per state of the files, not once per connection
            self._failed = signature
            log.error("event=xds_tls_reload_failed cert=%s error=%r kept=last-good", self.cert, error)
        return None

    def _files(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])

    def _stat(self) -> tuple:
        """Each file's (inode, size, mtime), following symlinks as Kubernetes Secret mounts swap them."""
        out = []
        for path in self._files():
            try:
                st = os.stat(path)
            except OSError as exc:
                raise TlsFileError(f"{path}: {exc.strerror}") from None
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """Read the files and check them as OpenSSL will (the key matches the certificate, the CA
        parses); raises `TlsFileError` naming the file."""
        data = {path: _read(path) for path in self._files()}
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key, password=b"")  # never a prompt
        except (ssl.SSLError, OSError) as exc:
            raise TlsFileError(f"{self.cert} with key {self.key}: {exc}") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cadata=data[self.client_ca].decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise TlsFileError(f"{self.client_ca}: not a PEM CA certificate: {exc}") from None
        if {path: _read(path) for path in self._files()} != data:  # changed while being checked
            raise TlsFileError(f"{self.cert}: changed while being read")
        return grpc.ssl_server_certificate_configuration(
            [(data[self.key], data[self.cert])], data[self.client_ca] if self.client_ca else None
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"{path}: {exc.strerror}") from None
