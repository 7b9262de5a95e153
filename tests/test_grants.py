"""Access grants: real HS256 JWTs, and hand-built tokens for everything pyjwt would refuse to make.

Every `RejectReason` has a case in `REJECTIONS`; `test_every_reason_has_a_case` keeps it so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import pickle
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from poolfs.grants import (
    GRANT_LIFETIME_SECONDS,
    MIN_SECRET_BYTES,
    GrantClaims,
    GrantRejected,
    GrantSecret,
    Permission,
    RejectReason,
    issue_grant,
    parse_permission,
    permission_mode,
    verify_grant,
)

pytestmark = pytest.mark.core

KEY = bytes(range(100, 140))  # 40 bytes, printable and not, so every rendering can be searched
OTHER_KEY = bytes(range(1, 41))
POOL = uuid.UUID("a1b2c3d4-e5f6-7890-1234-567890abcdef")
APP = uuid.UUID("b1b2c3d4-e5f6-7890-1234-567890abcdef")
TENANT = "tenant-a"
NOW = datetime(2030, 5, 17, 12, 0, 0, tzinfo=UTC)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def hand_token(
    header: dict[str, Any],
    payload: dict[str, Any] | bytes,
    key: bytes | None,
    digest: Callable[[], Any] = hashlib.sha256,
) -> str:
    """A compact JWS built without pyjwt; key None leaves the signature empty."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(body)}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def good_claims(**overrides: Any) -> dict[str, Any]:
    iat = int(NOW.timestamp())
    claims: dict[str, Any] = {
        "datapoolId": str(POOL),
        "applicationId": str(APP),
        "tenantId": TENANT,
        "permission": "VIEW",
        "iat": iat,
        "exp": iat + GRANT_LIFETIME_SECONDS,
        "jti": "f" * 32,
    }
    claims.update(overrides)
    return claims


def our_header(**extra: Any) -> dict[str, Any]:
    return {"alg": "HS256", "typ": "JWT", "kid": GrantSecret(KEY).key_id(), **extra}


def split(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    header, payload, signature = token.split(".")
    return (
        json.loads(b64url_decode(header)),
        json.loads(b64url_decode(payload)),
        b64url_decode(signature),
    )


def verify(token: str, **overrides: Any) -> GrantClaims:
    kwargs: dict[str, Any] = {
        "datapool_id": POOL,
        "application_id": APP,
        "tenant_id": TENANT,
        "now": NOW + timedelta(seconds=1),
    }
    kwargs.update(overrides)
    return verify_grant(GrantSecret(KEY), token, **kwargs)


# ------------------------------------------------------------------------------ issuing


def test_issued_token_is_standard_hs256_with_every_claim() -> None:
    token = issue_grant(GrantSecret(KEY), POOL, APP, TENANT, "MODIFY", now=NOW)
    header, payload, signature = split(token)
    assert header["alg"] == "HS256"
    assert header["typ"] == "JWT"
    assert set(payload) == {
        "datapoolId",
        "applicationId",
        "tenantId",
        "permission",
        "iat",
        "exp",
        "jti",
    }
    assert payload["datapoolId"] == str(POOL)
    assert payload["applicationId"] == str(APP)
    assert payload["tenantId"] == TENANT
    assert payload["permission"] == "MODIFY"
    assert payload["iat"] == int(NOW.timestamp())
    assert payload["exp"] - payload["iat"] == 15 * 60
    # Any HS256 implementation verifies it: the signature is HMAC-SHA256 over header.payload.
    signing_input = token.rsplit(".", 1)[0].encode()
    assert signature == hmac.new(KEY, signing_input, hashlib.sha256).digest()


def test_verify_returns_the_claims_and_the_token_is_reusable() -> None:
    token = issue_grant(GrantSecret(KEY), POOL, APP, TENANT, Permission.VIEW, now=NOW)
    first = verify(token)
    second = verify(token, now=NOW + timedelta(minutes=14, seconds=59))
    assert first == second
    assert first.datapool_id == POOL
    assert first.application_id == APP
    assert first.tenant_id == TENANT
    assert first.permission is Permission.VIEW
    assert first.mode == "ro"
    assert first.issued_at == NOW
    assert first.expires_at == NOW + timedelta(minutes=15)
    assert len(first.jti) >= 16


def test_ids_may_be_given_as_strings_in_any_uuid_spelling() -> None:
    token = issue_grant(GrantSecret(KEY), str(POOL).upper(), str(APP), TENANT, "VIEW", now=NOW)
    claims = verify(token, datapool_id=str(POOL), application_id=APP.hex)
    assert claims.datapool_id == POOL


def test_each_grant_has_its_own_jti() -> None:
    secret = GrantSecret(KEY)
    tokens = {issue_grant(secret, POOL, APP, TENANT, "VIEW", now=NOW) for _ in range(5)}
    assert len({split(t)[1]["jti"] for t in tokens}) == 5


def test_default_now_is_the_current_time() -> None:
    token = issue_grant(GrantSecret(KEY), POOL, APP, TENANT, "VIEW")
    claims = verify_grant(
        GrantSecret(KEY), token, datapool_id=POOL, application_id=APP, tenant_id=TENANT
    )
    assert abs((claims.issued_at - datetime.now(UTC)).total_seconds()) < 60


@pytest.mark.parametrize("bad", ["ADMIN", "view", "", "READ"])
def test_issuing_refuses_unknown_permissions(bad: str) -> None:
    with pytest.raises(ValueError, match="VIEW or MODIFY"):
        issue_grant(GrantSecret(KEY), POOL, APP, TENANT, bad)


def test_issuing_refuses_ids_that_are_not_uuids() -> None:
    with pytest.raises(ValueError, match="datapool_id is not a valid UUID"):
        issue_grant(GrantSecret(KEY), "pool-1", APP, TENANT, "VIEW")


@pytest.mark.parametrize(
    ("permission", "mode"),
    [("VIEW", "ro"), ("MODIFY", "rw"), (Permission.VIEW, "ro"), (Permission.MODIFY, "rw")],
)
def test_permission_mode(permission: str, mode: str) -> None:
    assert permission_mode(permission) == mode
    assert parse_permission(permission) == Permission(permission)


def test_permission_mode_refuses_unknown_permission() -> None:
    with pytest.raises(ValueError, match="'OWNER'"):
        permission_mode("OWNER")


def test_modify_grant_gives_a_writeable_mode() -> None:
    token = issue_grant(GrantSecret(KEY), POOL, APP, TENANT, "MODIFY", now=NOW)
    assert verify(token).mode == "rw"


# ---------------------------------------------------------------------------- rejections


@dataclass(frozen=True)
class Case:
    token: Callable[[], str]
    message: str
    verify_kwargs: dict[str, Any] | None = None


def _issued(permission: str = "VIEW") -> str:
    return issue_grant(GrantSecret(KEY), POOL, APP, TENANT, permission, now=NOW)


def _tampered_payload() -> str:
    header, _, signature = _issued("VIEW").split(".")
    payload = b64url(json.dumps(good_claims(permission="MODIFY")).encode())
    return f"{header}.{payload}.{signature}"


def _tampered_signature() -> str:
    header, payload, signature = _issued().split(".")
    flipped = bytearray(b64url_decode(signature))
    flipped[0] ^= 0x01
    return f"{header}.{payload}.{b64url(bytes(flipped))}"


REJECTIONS: dict[str, Case] = {
    "signed with another secret": Case(
        lambda: issue_grant(GrantSecret(OTHER_KEY), POOL, APP, TENANT, "VIEW", now=NOW),
        "does not verify",
    ),
    "hand-signed with another key, no kid": Case(
        lambda: hand_token({"alg": "HS256", "typ": "JWT"}, good_claims(), OTHER_KEY),
        "does not verify",
    ),
    "payload changed after signing": Case(_tampered_payload, "altered"),
    "signature bytes changed": Case(_tampered_signature, "altered"),
    "expired exactly at exp": Case(_issued, "expired", {"now": NOW + timedelta(minutes=15)}),
    "expired long ago": Case(_issued, "expired", {"now": NOW + timedelta(days=2)}),
    "alg none": Case(
        lambda: hand_token({"alg": "none", "typ": "JWT"}, good_claims(), None), "none"
    ),
    "alg None": Case(lambda: hand_token({"alg": "None"}, good_claims(), None), "none"),
    "alg none with our kid and a signature": Case(
        lambda: hand_token(our_header(alg="none"), good_claims(), KEY), "none"
    ),
    "HS512 with the right key": Case(
        lambda: hand_token(our_header(alg="HS512"), good_claims(), KEY, hashlib.sha512), "HS512"
    ),
    "HS384 with the right key": Case(
        lambda: hand_token(our_header(alg="HS384"), good_claims(), KEY, hashlib.sha384), "HS384"
    ),
    "RS256 header": Case(lambda: hand_token({"alg": "RS256"}, good_claims(), KEY), "RS256"),
    "ES256 header": Case(lambda: hand_token({"alg": "ES256"}, good_claims(), KEY), "ES256"),
    "unknown permission ADMIN": Case(
        lambda: hand_token(our_header(), good_claims(permission="ADMIN"), KEY), "'ADMIN'"
    ),
    "lowercase permission": Case(
        lambda: hand_token(our_header(), good_claims(permission="view"), KEY), "'view'"
    ),
    "other pool": Case(_issued, str(POOL), {"datapool_id": uuid.uuid4()}),
    "other application": Case(_issued, str(APP), {"application_id": uuid.uuid4()}),
    "other tenant": Case(_issued, "'tenant-a'", {"tenant_id": "tenant-b"}),
    "two segments": Case(lambda: "abc.def", "three"),
    "four segments": Case(lambda: _issued() + ".xyz", "three"),
    "empty": Case(lambda: "", "three"),
    "header not JSON": Case(lambda: f"{b64url(b'not json')}.{b64url(b'{}')}.", "header"),
    "header a JSON list": Case(lambda: f"{b64url(b'[1]')}.{b64url(b'{}')}.", "header"),
    "header without alg": Case(lambda: hand_token({"typ": "JWT"}, good_claims(), KEY), "alg"),
    "payload not base64": Case(
        lambda: f"{b64url(json.dumps(our_header()).encode())}.!!!.{b64url(b'x' * 32)}",
        "unreadable",
    ),
    "payload signed but not JSON": Case(
        lambda: hand_token(our_header(), b"not json", KEY), "not JSON"
    ),
    "payload signed but a list": Case(lambda: hand_token(our_header(), b"[1, 2]", KEY), "object"),
}

for _claim in ("datapoolId", "applicationId", "tenantId", "permission", "iat", "exp", "jti"):
    REJECTIONS[f"missing {_claim}"] = Case(
        (
            lambda c: (
                lambda: hand_token(
                    our_header(), {k: v for k, v in good_claims().items() if k != c}, KEY
                )
            )
        )(_claim),
        _claim,
    )

for _name, _claim, _value in [
    ("datapoolId int", "datapoolId", 123),
    ("datapoolId not a uuid", "datapoolId", "pool-1"),
    ("applicationId null", "applicationId", None),
    ("tenantId int", "tenantId", 5),
    ("tenantId empty", "tenantId", ""),
    ("permission int", "permission", 1),
    ("iat string", "iat", "now"),
    ("exp string", "exp", "later"),
    ("exp boolean", "exp", True),
    ("exp out of range", "exp", 10**30),
    ("jti list", "jti", ["a"]),
]:
    REJECTIONS[_name] = Case(
        (lambda c, v: lambda: hand_token(our_header(), good_claims(**{c: v}), KEY))(_claim, _value),
        _claim if _name != "exp out of range" else "out of range",
    )

EXPECTED_REASON: dict[str, RejectReason] = {
    "signed with another secret": RejectReason.BAD_SIGNATURE,
    "hand-signed with another key, no kid": RejectReason.BAD_SIGNATURE,
    "payload changed after signing": RejectReason.TAMPERED,
    "signature bytes changed": RejectReason.TAMPERED,
    "expired exactly at exp": RejectReason.EXPIRED,
    "expired long ago": RejectReason.EXPIRED,
    "alg none": RejectReason.ALG_NONE,
    "alg None": RejectReason.ALG_NONE,
    "alg none with our kid and a signature": RejectReason.ALG_NONE,
    "HS512 with the right key": RejectReason.WRONG_ALGORITHM,
    "HS384 with the right key": RejectReason.WRONG_ALGORITHM,
    "RS256 header": RejectReason.WRONG_ALGORITHM,
    "ES256 header": RejectReason.WRONG_ALGORITHM,
    "unknown permission ADMIN": RejectReason.UNKNOWN_PERMISSION,
    "lowercase permission": RejectReason.UNKNOWN_PERMISSION,
    "other pool": RejectReason.POOL_MISMATCH,
    "other application": RejectReason.APPLICATION_MISMATCH,
    "other tenant": RejectReason.TENANT_MISMATCH,
    "two segments": RejectReason.MALFORMED,
    "four segments": RejectReason.MALFORMED,
    "empty": RejectReason.MALFORMED,
    "header not JSON": RejectReason.MALFORMED,
    "header a JSON list": RejectReason.MALFORMED,
    "header without alg": RejectReason.MALFORMED,
    "payload not base64": RejectReason.MALFORMED,
    "payload signed but not JSON": RejectReason.MALFORMED,
    "payload signed but a list": RejectReason.MALFORMED,
}
for _name in REJECTIONS:
    if _name.startswith("missing "):
        EXPECTED_REASON[_name] = RejectReason.MISSING_CLAIM
    elif _name not in EXPECTED_REASON:
        EXPECTED_REASON[_name] = RejectReason.BAD_CLAIM_TYPE


@pytest.mark.parametrize("name", sorted(REJECTIONS))
def test_rejection(name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="poolfs.grants")
    case = REJECTIONS[name]
    token = case.token()
    with pytest.raises(GrantRejected) as info:
        verify(token, **(case.verify_kwargs or {}))
    assert info.value.reason is EXPECTED_REASON[name]
    assert case.message in info.value.message
    assert info.value.reason.value in str(info.value)
    # Neither the secret nor the token shows up in the error or the log.
    texts = [str(info.value), repr(info.value), *(r.getMessage() for r in caplog.records)]
    for text in texts:
        assert_no_secret(text)
        if len(token) > 20:
            assert token not in text


def test_every_reason_has_a_case() -> None:
    assert set(EXPECTED_REASON.values()) == set(RejectReason)
    assert set(EXPECTED_REASON) == set(REJECTIONS)


def test_the_key_id_is_not_a_signing_key() -> None:
    # The kid header is public; signing with it as the key must not pass.
    forged = hand_token(our_header(), good_claims(), GrantSecret(KEY).key_id().encode())
    with pytest.raises(GrantRejected) as info:
        verify(forged)
    assert info.value.reason is RejectReason.TAMPERED


def test_verify_refuses_a_naive_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(_issued(), now=datetime(2030, 1, 1))


# ------------------------------------------------------------------------------- secrets


def renderings(key: bytes) -> list[str]:
    return [
        key.hex(),
        key.decode("latin-1"),
        repr(key),
        base64.b64encode(key).decode(),
        b64url(key),
    ]


def assert_no_secret(text: str) -> None:
    for form in renderings(KEY):
        assert form not in text


def test_secret_shorter_than_32_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="31 bytes, at least 32") as info:
        GrantSecret(b"s" * 31)
    assert "s" * 31 not in str(info.value)
    assert len(GrantSecret(b"s" * MIN_SECRET_BYTES).key_id()) > 8


def test_secret_must_be_bytes() -> None:
    with pytest.raises(TypeError, match="bytes"):
        GrantSecret("a string secret that is long enough" * 2)  # type: ignore[arg-type]


def test_secret_never_shows_in_repr_str_format_or_pickle() -> None:
    secret = GrantSecret(KEY)
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
        assert text == "GrantSecret(<redacted>)" or "GrantSecret(<redacted>)" in text
        assert_no_secret(text)
    assert not hasattr(secret, "__dict__")
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(secret)


def test_secret_from_file(tmp_path: Path) -> None:
    path = tmp_path / "grant.key"
    path.write_bytes(KEY + b"\n")
    secret = GrantSecret.from_file(path)
    token = issue_grant(secret, POOL, APP, TENANT, "VIEW", now=NOW)
    assert verify(token).datapool_id == POOL  # same key as GrantSecret(KEY): newline dropped
    path.write_bytes(KEY + b"\r\n")
    assert GrantSecret.from_file(path).key_id() == GrantSecret(KEY).key_id()


def test_short_secret_file_is_refused_without_showing_its_content(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_bytes(b"hunter2-hunter2\n")
    with pytest.raises(ValueError, match="too short: 15 bytes") as info:
        GrantSecret.from_file(path)
    assert str(path) in str(info.value)
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_missing_secret_file() -> None:
    with pytest.raises(FileNotFoundError):
        GrantSecret.from_file("/nonexistent/grant.key")


def test_generated_secrets_differ_and_work() -> None:
    one, two = GrantSecret.generate(), GrantSecret.generate()
    assert one.key_id() != two.key_id()
    token = issue_grant(one, POOL, APP, TENANT, "VIEW")
    with pytest.raises(GrantRejected) as info:
        verify_grant(two, token, datapool_id=POOL, application_id=APP, tenant_id=TENANT)
    assert info.value.reason is RejectReason.BAD_SIGNATURE


def test_key_id_does_not_reveal_the_secret() -> None:
    kid = GrantSecret(KEY).key_id()
    assert_no_secret(kid)
    assert kid != GrantSecret(OTHER_KEY).key_id()
