"""Unit: settings come from VERLYARD_* variables; every bad value is one clear error naming it."""

from __future__ import annotations

import pytest

from verlyard_shared.settings import SettingsError, load_settings, parse_labels


def test_defaults_bind_the_api_to_loopback() -> None:
    settings = load_settings({"VERLYARD_HOME": "/tmp/vy-home"})
    assert settings.api_host == "127.0.0.1"
    assert settings.api_port == 8400
    assert settings.api_url == "http://127.0.0.1:8400"
    assert str(settings.home) == "/tmp/vy-home"
    assert settings.database_url is None and settings.nats_url is None


def test_values_are_read_and_converted() -> None:
    settings = load_settings(
        {
            "VERLYARD_DATABASE_URL": "postgresql://u:p@db:5432/verlyard",
            "VERLYARD_NATS_URL": "nats://n1:4222,nats://n2:4222",
            "VERLYARD_API_PORT": "9000",
            "VERLYARD_AGENT_LABELS": "gpu=h100, zone=a",
            "VERLYARD_AGENT_SLOTS": "4",
            "VERLYARD_LOG_FORMAT": "json",
        }
    )
    assert settings.api_port == 9000
    assert settings.agent_labels == {"gpu": "h100", "zone": "a"}
    assert settings.agent_slots == 4
    assert settings.log_format == "json"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("VERLYARD_API_PORT", "eighty", "VERLYARD_API_PORT='eighty' is not an integer"),
        ("VERLYARD_API_PORT", "70000", "VERLYARD_API_PORT=70000 is out of range"),
        ("VERLYARD_DATABASE_URL", "mysql://x/y", "VERLYARD_DATABASE_URL must be a URL like postgresql://"),
        ("VERLYARD_NATS_URL", "localhost:4222", "VERLYARD_NATS_URL must be a URL like nats://"),
        ("VERLYARD_API_URL", "ftp://x", "VERLYARD_API_URL must be a URL like http://"),
        ("VERLYARD_LOG_FORMAT", "xml", "VERLYARD_LOG_FORMAT='xml' must be one of"),
        ("VERLYARD_LOG_LEVEL", "loud", "VERLYARD_LOG_LEVEL='loud' must be one of"),
        ("VERLYARD_AGENT_LABELS", "gpu", "VERLYARD_AGENT_LABELS: 'gpu' is not key=value"),
        ("VERLYARD_AGENT_ID", "a.b", "VERLYARD_AGENT_ID='a.b' may hold only"),
        ("VERLYARD_LEASE_S", "0", "VERLYARD_LEASE_S=0.0 is out of range"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(".", r"\.").replace("?", r"\?")):
        load_settings({name: value})


def test_secrets_never_appear_in_errors() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"VERLYARD_DATABASE_URL": "mysql://admin:hunter2@db/x"})
    assert "hunter2" not in str(raised.value)


def test_labels_parser_skips_empty_items() -> None:
    assert parse_labels("a=1,,b=2,") == {"a": "1", "b": "2"}


def test_nats_tls_files_are_read_and_the_client_pair_goes_together() -> None:
    from verlyard_shared.nats_topology import NatsTls, nats_tls

    assert nats_tls(load_settings({})) is None
    ca = load_settings({"VERLYARD_NATS_CA_FILE": "/etc/verlyard/ca.pem"})
    assert nats_tls(ca) == NatsTls(ca_file="/etc/verlyard/ca.pem")
    pair = load_settings({"VERLYARD_NATS_CERT_FILE": "/c.pem", "VERLYARD_NATS_KEY_FILE": "/k.pem"})
    assert nats_tls(pair) == NatsTls(cert_file="/c.pem", key_file="/k.pem")
    with pytest.raises(SettingsError, match="VERLYARD_NATS_KEY_FILE"):
        load_settings({"VERLYARD_NATS_CERT_FILE": "/c.pem"})
    with pytest.raises(SettingsError, match="VERLYARD_NATS_CERT_FILE"):
        load_settings({"VERLYARD_NATS_KEY_FILE": "/k.pem"})
