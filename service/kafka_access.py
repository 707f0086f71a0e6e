"""How the service's Kafka clients authenticate, and a start-up check that the brokers let them in.

Every Kafka client the service makes (the trainer's consumer and admin client, the dead-letter
producer and reader, the `produce` command) takes ``client_options``: the security protocol, the CA,
a client certificate, SASL (SCRAM) credentials. kafka-python treats a refused password or certificate
like a broker that is away: it retries until a timeout and then says only that it could not bootstrap.
``check_access`` runs first and turns that into an error that names the setting, so a wrong password
stops the trainer at start instead of a retry loop that looks alive. No secret is ever in a message.
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from service.settings import Settings, SettingsError

log = logging.getLogger(__name__)

#: How long the start-up check waits for the brokers to answer.
CHECK_TIMEOUT_S = 10.0


def client_options(settings: Settings) -> dict[str, Any]:
    """kafka-python options for the settings' security (none beyond the protocol for PLAINTEXT)."""
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_cafile"] = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        if settings.kafka_ssl_certfile is not None and settings.kafka_ssl_keyfile is not None:
            options["ssl_certfile"] = str(settings.kafka_ssl_certfile)
            options["ssl_keyfile"] = str(settings.kafka_ssl_keyfile)
    if settings.kafka_security_protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # the settings check it
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


class _Errors(logging.Handler):
    """Keeps the messages kafka-python logs at ERROR while the check runs (its only account of why)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_access(settings: Settings, timeout_s: float = CHECK_TIMEOUT_S, attempts: int = 3) -> None:
    """SettingsError naming the setting if the brokers refuse the settings' password or certificates.

    A broker that does not answer at all is not an error here (the service waits for it, as always).
    One that only dropped connections is asked again, up to ``attempts`` times: a broker busy with its
    TLS handshakes drops some before it says why (seen on a loaded two-core machine).
    """
    if settings.kafka_bootstrap is None or settings.kafka_security_protocol == "PLAINTEXT":
        return
    for _ in range(attempts):
        if _check_once(settings, timeout_s):
            return


def _check_once(settings: Settings, timeout_s: float) -> bool:
    """True if the brokers let us in; SettingsError if they refused us; False if they did not say."""
    errors = _Errors()
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(errors)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id="continual-access-check",
            request_timeout_ms=int(timeout_s * 1000),
            **client_options(settings),
        )
        admin.close()
        return True
    except KafkaError as exc:
        failure = exc
    finally:
        kafka_log.removeHandler(errors)
    said = " ".join(errors.messages)
    if "SaslAuthenticationFailed" in said:
        raise SettingsError(
            f"kafka_sasl_username / kafka_sasl_password: the brokers at {settings.kafka_bootstrap} refused "
            f"{settings.kafka_sasl_mechanism} authentication as {settings.kafka_sasl_username!r}"
        )
    if "CERTIFICATE_VERIFY_FAILED" in said:
        raise SettingsError(
            f"kafka_ssl_cafile: the certificate of the brokers at {settings.kafka_bootstrap} is not "
            f"signed by {settings.kafka_ssl_cafile or 'a CA this machine trusts'}"
        )
    if "BAD_CERTIFICATE" in said or "CERTIFICATE_REQUIRED" in said:
        raise SettingsError(
            f"kafka_ssl_certfile / kafka_ssl_keyfile: the brokers at {settings.kafka_bootstrap} refused "
            f"the client certificate ({settings.kafka_ssl_certfile or 'none was given'})"
        )
    log.warning("Kafka at %s did not answer the access check: %s", settings.kafka_bootstrap, failure)
    return False
