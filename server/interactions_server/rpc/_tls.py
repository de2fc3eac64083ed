"""TLS and mutual TLS server credentials that follow their files.

gRPC asks the fetcher for a new certificate configuration on every new
handshake (grpc.dynamic_ssl_server_credentials); it re-reads the files only
when one of them changed (size or modification time), so a rotated
certificate is served without a restart. Replace the files by renaming new
ones over them, so that a handshake never sees a certificate without its key.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

_log = logging.getLogger("interactions_server.tls")


class TlsFilesError(Exception):
    """A certificate, key or CA file cannot be read; the message names it."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate it signed

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


_Stamp = tuple[tuple[int, int], ...]


class _Fetcher:
    """The certificate-configuration fetcher: None (keep the current one)
    unless a file changed since the last load."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._stamp: _Stamp = ()  # of the files in use
        self._failed: _Stamp = ()  # of files that did not load: logged once, not per handshake

    def _read_stamp(self) -> _Stamp:
        stats = [os.stat(path) for path in self._files.paths]
        return tuple((s.st_mtime_ns, s.st_size) for s in stats)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """Reads the files now; raises TlsFilesError naming one that cannot be read."""
        try:
            stamp = self._read_stamp()
        except OSError as exc:
            raise TlsFilesError(f"cannot read {exc.filename}: {exc.strerror}") from None
        contents = []
        for path in self._files.paths:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise TlsFilesError(f"cannot read {path}: {exc.strerror}") from None
            if b"-----BEGIN " not in data:
                raise TlsFilesError(f"{path} is not a PEM file")
            contents.append(data)
        cert, key, *ca = contents
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca[0] if ca else None)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._read_stamp()
            if stamp in (self._stamp, self._failed):
                return None
            config = self.load()
        except (OSError, TlsFilesError) as exc:  # mid-rotation: keep serving the current certificate
            if self._failed != (failed := self._safe_stamp()):
                self._failed = failed
                _log.error("TLS files not reloaded, the current certificate stays in use: %s", exc)
            return None
        _log.info("TLS certificate reloaded from %s", self._files.cert)
        return config

    def _safe_stamp(self) -> _Stamp:
        try:
            return self._read_stamp()
        except OSError:
            return ((-1, -1),)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for add_secure_port; raises TlsFilesError when a file is unreadable."""
    fetcher = _Fetcher(files)
    initial = fetcher.load()
    return grpc.dynamic_ssl_server_credentials(
        initial, fetcher, require_client_authentication=files.client_ca is not None
    )
