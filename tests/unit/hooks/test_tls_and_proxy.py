"""TLS and proxies on both transports: a vendor behind a certificate the process trusts
(REQUESTS_CA_BUNDLE) is reached, one it does not trust is never sent to, and a send URL a proxy
applies to goes through the threaded transport, the only one that speaks proxies."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from airflow_provider_pepipost.errors import PepipostNotSentError
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.messages import MediaMessage

MESSAGE = MediaMessage("919833078369", "sandbox-source", attachment_id="media-1", caption="Hi", api_header="h-1")
SUCCESS = json.dumps({"status": "success", "data": {"id": "tls-1"}}).encode()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class _Vendor(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    posts = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(SUCCESS)))
        self.end_headers()
        self.wfile.write(SUCCESS)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tls_vendor(tmp_path) -> Iterator[tuple[str, Path]]:
    """An HTTPS vendor on 127.0.0.1; yields its base URL and its certificate's path."""
    cert_path, key_path = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    _Vendor.posts = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Vendor)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert_path
    server.shutdown()
    server.server_close()


def send(hook: PepipostHook, transport: str) -> str:
    if transport == "threads":
        return hook.send_message(MESSAGE)

    async def on_a_loop() -> str:
        try:
            return await hook.asend_message(MESSAGE)
        finally:
            hook.aclose()

    return asyncio.run(on_a_loop())


@pytest.mark.parametrize("transport", ["threads", "event_loop"])
def test_a_vendor_whose_certificate_the_process_trusts_is_reached(tls_vendor, pepipost_conn, monkeypatch, transport):
    url, cert_path = tls_vendor
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_path))
    pepipost_conn(url)
    assert send(PepipostHook(), transport) == "tls-1"


@pytest.mark.parametrize("transport", ["threads", "event_loop"])
def test_a_certificate_nobody_vouches_for_is_never_sent_to(tls_vendor, pepipost_conn, monkeypatch, transport):
    url, _ = tls_vendor
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    pepipost_conn(url, max_retries=2)
    with pytest.raises(PepipostNotSentError) as caught:
        send(PepipostHook(), transport)
    assert "certificate" in str(caught.value) and "could not be verified" in str(caught.value)
    assert not caught.value.retryable  # a certificate does not mend itself between retries
    assert _Vendor.posts == 0


def test_a_proxy_for_the_send_url_keeps_the_campaign_on_the_threaded_transport(pepipost_conn, monkeypatch):
    pepipost_conn("https://waapi.example.test")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert not PepipostHook().event_loop_possible()
    monkeypatch.setenv("NO_PROXY", "waapi.example.test")
    assert PepipostHook().event_loop_possible()
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("NO_PROXY")
    assert PepipostHook().event_loop_possible()
