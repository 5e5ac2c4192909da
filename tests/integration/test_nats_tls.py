"""Integration: NATS with TLS for real (a throwaway CA, a nats-server with `EmbeddedNats(tls=...)`).

Shows what docs/operations.md promises for NATS across networks: a client that trusts the CA (via
VERLYARD_NATS_CA_FILE -> `nats_tls` -> `connect_nats(tls=...)`) connects and uses JetStream, a real
agent runs a stage over it, and the server refuses both a plain-text client and a client that does
not trust the CA. With `verify: true` (mutual TLS) a client without a certificate is refused too.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import secrets
import ssl
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client as NATS

from tests.integration.agent_support import agent_config, finished, run_stage, running_agent, send
from verlyard_shared.embedded.nats import EmbeddedNats, TlsConfig
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.nats_topology import NatsTls, connect_nats, ensure_topology, nats_tls
from verlyard_shared.settings import load_settings

# ---------------------------------------------------------------- a throwaway PKI


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Issued
    client: Issued
    other_ca: Path
    """A CA that signed nothing the server shows: trusting it alone must not be enough."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _ca(directory: Path, common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{common_name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def _issue(
    directory: Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path],
    *,
    server: bool,
) -> Issued:
    ca_cert, ca_key, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    issued = Issued(cert=directory / f"{name}.pem", key=directory / f"{name}-key.pem")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, issued.key)
    return issued


def _pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "verlyard-test-ca")
    other = _ca(directory, "someone-elses-ca")
    return Pki(
        ca=ca[2],
        server=_issue(directory, "nats-server", ca, server=True),
        client=_issue(directory, "nats-client", ca, server=False),
        other_ca=other[2],
    )


# ---------------------------------------------------------------- servers


@contextlib.contextmanager
def _server(root: Path, tls: TlsConfig) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(root, free_port(), user="verlyard", password="test_" + secrets.token_hex(16), tls=tls)
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[EmbeddedNats]:
    tls = TlsConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key))
    with _server(tmp_path_factory.mktemp("nats-tls"), tls) as server:
        yield server


def _connections(server: EmbeddedNats) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{server.monitor_url}/connz", timeout=5) as response:  # a local test server
        return json.loads(response.read())["connections"] or []


async def _connect(server: EmbeddedNats, tls: NatsTls | None, name: str = "tls-test") -> NATS:
    return await connect_nats(
        server.url, name=name, user=server.user, password=server.password, tls=tls, connect_timeout=2.0
    )


async def _connect_and_close(server: EmbeddedNats, tls: NatsTls | None) -> None:
    nc = await _connect(server, tls)
    await nc.close()


# ---------------------------------------------------------------- tests


def test_the_server_says_it_requires_tls(tls_server: EmbeddedNats) -> None:
    assert "tls {" in tls_server.config_path.read_text()


async def test_a_client_that_trusts_the_ca_uses_jetstream_over_tls(tls_server: EmbeddedNats, pki: Pki) -> None:
    nc = await _connect(tls_server, NatsTls(ca_file=str(pki.ca)), name="tls-trusting")
    try:
        js = nc.jetstream()
        await js.add_stream(name="TLS_CHECK", subjects=["tls.check"])
        ack = await js.publish("tls.check", b"over tls")
        assert ack.stream == "TLS_CHECK"
        sub = await js.pull_subscribe("tls.check", durable="tls-check")
        (msg,) = await sub.fetch(1, timeout=5)
        assert msg.data == b"over tls"
        await msg.ack()
        conns = await asyncio.to_thread(_connections, tls_server)
        ours = [c for c in conns if c.get("name") == "tls-trusting"]
        assert ours and ours[0].get("tls_version"), f"the server sees no TLS on our connection: {ours}"
    finally:
        await nc.close()


async def test_a_tls_url_works_the_same(tls_server: EmbeddedNats, pki: Pki) -> None:
    url = tls_server.url.replace("nats://", "tls://")
    settings = load_settings({"VERLYARD_NATS_URL": url, "VERLYARD_NATS_CA_FILE": str(pki.ca)})
    assert settings.nats_url == url
    nc = await connect_nats(
        url, name="tls-url", user=tls_server.user, password=tls_server.password, tls=nats_tls(settings)
    )
    try:
        await nc.flush(timeout=5)
    finally:
        await nc.close()


async def test_a_plain_text_client_is_refused(tls_server: EmbeddedNats) -> None:
    # nats-py always upgrades when the server asks, so speak the protocol by hand, as a plain client would.
    reader, writer = await asyncio.open_connection(tls_server.host, tls_server.port)
    try:
        info = await asyncio.wait_for(reader.readline(), timeout=5)
        assert info.startswith(b"INFO ")
        assert json.loads(info[5:])["tls_required"] is True
        connect = {"verbose": False, "pedantic": False, "user": tls_server.user, "pass": tls_server.password}
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        await writer.drain()
        answer = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(4096):  # until the server hangs up
                    answer += chunk
        assert b"PONG" not in answer, "the server spoke NATS in plain text"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("trust", ["system CAs", "another CA"])
async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: EmbeddedNats, pki: Pki, trust: str) -> None:
    tls = None if trust == "system CAs" else NatsTls(ca_file=str(pki.other_ca))
    started = asyncio.get_running_loop().time()
    # connect_nats gives up at the first failed verification (no retries, no waiting for its timeout).
    with pytest.raises(ssl.SSLCertVerificationError):
        await _connect_and_close(tls_server, tls)
    assert asyncio.get_running_loop().time() - started < 4.0


async def test_settings_name_the_ca_and_a_real_agent_runs_a_stage_over_tls(
    tls_server: EmbeddedNats, pki: Pki, tmp_path: Path
) -> None:
    settings = load_settings({"VERLYARD_NATS_URL": tls_server.url, "VERLYARD_NATS_CA_FILE": str(pki.ca)})
    tls = nats_tls(settings)
    assert tls == NatsTls(ca_file=str(pki.ca))
    nc = await _connect(tls_server, tls, name="tls-scheduler")
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        async with running_agent(agent_config(tmp_path, tls_server, agent_id="tls-agent", nats_tls=tls)) as agent:
            command = run_stage(agent.agent_id, "noop", {"sleep_ms": 10})
            await send(js, command)
            assert (await finished(js, command.attempt)).outcome == "succeeded"
    finally:
        await nc.close()


async def test_mutual_tls_needs_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    tls = TlsConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key), ca_file=str(pki.ca), verify=True)
    with _server(tmp_path / "nats-mtls", tls) as server:
        # The server ends the handshake with a TLS alert: the client sent no certificate. Under TLS 1.3
        # the client may already be writing CONNECT when the alert comes; it then sees the server
        # hang up (a reset or a broken pipe) instead of the alert itself.
        with pytest.raises((ssl.SSLError, ConnectionError)) as refused:
            await _connect_and_close(server, NatsTls(ca_file=str(pki.ca)))
        if isinstance(refused.value, ssl.SSLError):
            assert "certificate" in str(refused.value).lower(), refused.value
        mutual = NatsTls(ca_file=str(pki.ca), cert_file=str(pki.client.cert), key_file=str(pki.client.key))
        nc = await _connect(server, mutual, name="tls-mutual")
        try:
            await nc.publish("tls.mutual", b"hello")
            await nc.flush(timeout=5)
        finally:
            await nc.close()
