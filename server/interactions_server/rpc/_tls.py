"""TLS and mutual TLS server credentials that follow their files.

gRPC asks the fetcher for a new certificate configuration on every new
handshake (grpc.dynamic_ssl_server_credentials); it re-reads the files only
when one of them changed (size or modification time), so a rotated
certificate is served without a restart. Replace the files by renaming new
ones over them, so that a handshake never sees a certificate without its key.
A certificate that does not match its key (or an unreadable file) is not
handed to gRPC: one ERROR is logged and the current certificate stays.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

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
        _check_pair(cert, key, self._files)
        if ca:
            _certificates(ca[0], self._files.client_ca)  # type: ignore[arg-type]  # set when ca is
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


def _certificates(pem: bytes, path: Path) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TlsFilesError(f"{path} holds no readable PEM certificate") from None
    return certificates


def _public_key(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _check_pair(cert: bytes, key: bytes, files: TlsFiles) -> None:
    """The certificate (the first of its chain) and the private key belong
    together. Checked here because gRPC core, handed a pair that does not,
    keeps its previous certificate but says so only on stderr, in its own
    format ("Invalid private key"), while the reload would look successful."""
    leaf = _certificates(cert, files.cert)[0]
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        reason = "it is encrypted" if isinstance(exc, TypeError) else "it is not a readable PEM private key"
        raise TlsFilesError(f"{files.key} cannot be used: {reason}") from None
    if _public_key(leaf.public_key()) != _public_key(private.public_key()):
        raise TlsFilesError(
            f"the certificate {files.cert} does not match the private key {files.key} "
            "(replace both, renaming each into place)"
        )


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for add_secure_port; raises TlsFilesError when a file is unreadable."""
    fetcher = _Fetcher(files)
    initial = fetcher.load()
    return grpc.dynamic_ssl_server_credentials(
        initial, fetcher, require_client_authentication=files.client_ca is not None
    )
