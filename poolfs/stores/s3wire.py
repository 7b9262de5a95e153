"""A lean wire path for the S3 store's hot requests: GET, HEAD, ListObjectsV2, PutObject and
the multipart upload requests (CreateMultipartUpload, UploadPart, CompleteMultipartUpload,
AbortMultipartUpload).

Only `poolfs/stores/s3.py` uses this module. It sends those requests straight over one
urllib3 connection pool with its own SigV4 signature, because botocore's request building and
response parsing cost ~1-2 ms of CPU per request (more than the request itself against a local
server), over http botocore hashes every part body with SHA-256 to sign it, and making the
botocore client costs ~0.13 s of CPU and ~14 MiB (measured numbers in bench/README.md).
Everything else (credentials, region, endpoint, copies, deletes) stays with boto3/botocore,
which `s3.py` owns.

Invariants a newcomer must keep:

- Same answers as the botocore client. Success responses are returned in botocore's shapes
  (`ETag` quoted, `ContentLength`, `ContentRange`, `LastModified` as an aware datetime, user
  `Metadata` from `x-amz-meta-*` headers with the prefix cut, names as the server sent them,
  values as latin-1 decoded by http.client, exactly as botocore does). Failures are raised as
  the botocore exceptions the client would raise (`ClientError` with `Error.Code`/`Message`
  from the XML body, or for HEAD, which has no body, the status as code; the connection
  errors mapped as botocore's `URLLib3Session.send` maps them), so `s3._map_error` stays the
  one error table and callers handle both paths with the same `except` clauses.
- Same time bound: the attempts, connect/read timeouts and backoff of `s3.time_budget`
  (botocore "standard" mode: connection errors, 500/502/503/504 and throttling codes are
  retried, backoff rand() * min(scale * 2**i, 20) with scale 1 s for throttling and 50 ms
  otherwise). A GET body is read inside the attempt, so a broken body is retried like any
  other transient failure and its partial bytes are dropped.
- Never silently wrong: an answer this path does not understand (a 3xx redirect, a 400 on HEAD
  or AuthorizationHeaderMalformed / a region hint, a signature the server rejects) raises
  `Unsupported`; `s3.py` then repeats that call on the botocore client (which follows region
  redirects itself) and logs the first such case.
- Credentials are frozen per request from the session's credentials object, so refreshable
  credentials (SSO, assume-role, instance roles) are refreshed by botocore's own logic.
- Object bodies are returned as sent (`decode_content=False`): an object stored with
  `Content-Encoding: gzip` reads as its stored bytes, as with botocore.
- Signature: SigV4 with the empty-body SHA-256 as payload hash (valid for GET/HEAD over http
  and https); the signing key is cached per (secret, date, region). The small XML bodies of
  CompleteMultipartUpload are signed with their SHA-256. PutObject and UploadPart bodies are
  sent as `UNSIGNED-PAYLOAD` (accepted over http and https), from the staging file with
  sendfile(2) over http (`_SendfileConnection`) or in 1 MiB preads over https (or from
  memory), and sent anew from the file for every attempt. Integrity: over https as
  botocore's own client (`request_checksum_calculation="when_required"`: TLS, no body
  checksum); over http an `x-amz-checksum-crc32` header (ISA-L's crc32: ~0.02 ms per MiB,
  zlib's ~0.37 ms, SHA-256 ~0.6 ms) that the server checks (SeaweedFS answers BadDigest on a
  mismatch). What the CRC does not give is the payload signature's protection against a
  body altered on purpose in transit: plain http has none for reads either. A PUT (object or
  part) answered with 400 or 501 (a server that refuses the checksum header or the unsigned
  payload, or BadDigest: the part changed between its checksum and its sending) raises
  `Unsupported`, so botocore sends it again; 400 RequestTimeout and throttling codes are
  retried here as botocore retries them, and refusals of the object itself (EntityTooLarge,
  MetadataTooLarge, ...) are raised at once, as botocore would get them too.
- User metadata is sent as `x-amz-meta-*` headers only when every name and value is plain
  printable ASCII; anything else raises `Unsupported` before sending (botocore refuses
  non-ASCII metadata itself). A CompleteMultipartUpload answered 200 with an `<Error>` body is
  retried as a 500, as botocore does.
  Keys are encoded into the path as botocore does (`quote(key, safe="/~")`) and the path is
  signed as sent (S3 does not normalise paths).
"""

from __future__ import annotations

import base64
import calendar
import datetime
import hashlib
import hmac
import http.client
import os
import random
import re
import selectors
import socket
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import botocore.credentials
import botocore.exceptions
import botocore.utils
import urllib3
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.util
from isal.isal_zlib import crc32

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_ALGORITHM = "AWS4-HMAC-SHA256"
_UNRESERVED = "-_.~"

# botocore "standard" retry mode (botocore/retries/standard.py): what is retried and how long
# it waits. Kept in step with the botocore version in use by test_lean_retry_tables_match.
TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
TRANSIENT_CODES = frozenset(
    {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete"}
)
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "EC2ThrottledException",
        "PriorRequestNotComplete",
    }
)
_THROTTLING_SCALE = 1.0
_OTHER_SCALE = 0.05
_MAX_BACKOFF = 20.0

# Error codes that mean "this request was addressed or signed for another region/endpoint":
# botocore's client knows how to redirect these; this path does not.
_REDIRECT_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "PermanentRedirect", "TemporaryRedirect", "Redirect"}
)

KEPT_HEADERS = {
    "content-type": "ContentType",
    "content-encoding": "ContentEncoding",
    "content-disposition": "ContentDisposition",
    "content-language": "ContentLanguage",
}
_META_PREFIX = "x-amz-meta-"
# 400 answers to a PUT that are about the object, not about how this path sent it: botocore
# would get the same, so they are raised here instead of sending the body again.
_REFUSED_WHOEVER_SENDS = frozenset(
    {"EntityTooLarge", "EntityTooSmall", "MetadataTooLarge", "KeyTooLongError"}
)
# Operations whose 200 answer may carry an error (botocore handlers._handle_200_error).
_ERRORS_IN_200 = frozenset({"CompleteMultipartUpload"})
_AWS_HOST = re.compile(r"^s3(?:\.(?P<region>[a-z0-9-]+))?\.amazonaws\.com$")


class Unsupported(Exception):
    """An answer the lean path does not understand; repeat the call on the botocore client."""

    def __init__(self, reason: str, status: int, code: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code  # the S3 error code, where the answer had one


# --- timestamps --------------------------------------------------------------------------------

_ISO = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?Z")
_HTTP_DATE = re.compile(r"[A-Z][a-z]{2}, (\d\d) ([A-Z][a-z]{2}) (\d{4}) (\d\d):(\d\d):(\d\d) GMT")
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_EPOCH_DAY = datetime.date(1970, 1, 1).toordinal()
_UTC = datetime.UTC


def _epoch_seconds(year: int, month: int, day: int, hour: int, minute: int, second: int) -> int:
    days = datetime.date(year, month, day).toordinal() - _EPOCH_DAY
    return days * 86400 + hour * 3600 + minute * 60 + second


def iso_seconds_ns(text: str) -> int:
    """A ListObjectsV2 `LastModified` ("2024-01-02T03:04:05.678Z") as whole seconds in ns.

    The fixed format S3 servers send is parsed directly (~1 us); anything else goes through
    botocore's own parser (dateutil, ~50 us), so the result always equals botocore's.
    """
    match = _ISO.fullmatch(text)
    if match is not None:
        y, mo, d, h, mi, s = map(int, match.groups())
        if mo <= 12 and d <= 31 and h < 24 and mi < 60 and s < 60:
            try:
                return _epoch_seconds(y, mo, d, h, mi, s) * 1_000_000_000
            except ValueError:
                pass
    return seconds_ns(botocore.utils.parse_timestamp(text))


def seconds_ns(when: datetime.datetime) -> int:
    """An aware datetime as whole seconds in ns (S3 versions have one-second resolution)."""
    return calendar.timegm(when.utctimetuple()) * 1_000_000_000


def http_date(text: str) -> datetime.datetime:
    """A `Last-Modified` header ("Tue, 02 Jan 2024 03:04:05 GMT") as an aware UTC datetime."""
    match = _HTTP_DATE.fullmatch(text)
    if match is not None:
        d, mon, y, h, mi, s = match.groups()
        month = _MONTHS.get(mon)
        if month is not None:
            try:
                return datetime.datetime(int(y), month, int(d), int(h), int(mi), int(s), 0, _UTC)
            except ValueError:
                pass
    return botocore.utils.parse_timestamp(text)


# --- listing XML -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListResult:
    """One ListObjectsV2 page: `objects` as (full key, size, quoted etag, last_modified_ns)."""

    objects: list[tuple[str, int, str, int]]
    prefixes: list[str]
    next_token: str | None
    key_count: int


def _local(tag: str) -> str:
    return tag[tag.find("}") + 1 :]


def parse_list_page(body: bytes) -> ListResult:
    """Parse a ListObjectsV2 result; keys and prefixes are url-decoded when the server says
    `EncodingType` url (decoded with botocore's `unquote_plus`)."""
    root = ET.fromstring(body)
    objects: list[tuple[str, int, str, int]] = []
    prefixes: list[str] = []
    truncated = False
    token: str | None = None
    key_count: int | None = None
    encoded = False
    for child in root:
        name = _local(child.tag)
        if name == "Contents":
            key = etag = modified = ""
            size = 0
            for field in child:
                field_name = _local(field.tag)
                text = field.text or ""
                if field_name == "Key":
                    key = text
                elif field_name == "Size":
                    size = int(text)
                elif field_name == "ETag":
                    etag = text
                elif field_name == "LastModified":
                    modified = text
            objects.append((key, size, etag, iso_seconds_ns(modified)))
        elif name == "CommonPrefixes":
            for field in child:
                if _local(field.tag) == "Prefix":
                    prefixes.append(field.text or "")
        elif name == "IsTruncated":
            truncated = (child.text or "").strip().lower() == "true"
        elif name == "NextContinuationToken":
            token = child.text or None
        elif name == "KeyCount":
            key_count = int(child.text or 0)
        elif name == "EncodingType":
            encoded = (child.text or "").strip() == "url"
    if encoded:
        unquote = urllib.parse.unquote_plus
        objects = [(unquote(k), size, etag, ns) for k, size, etag, ns in objects]
        prefixes = [unquote(p) for p in prefixes]
    if key_count is None:
        key_count = len(objects) + len(prefixes)
    return ListResult(objects, prefixes, token if truncated else None, key_count)


def _error_fields(body: bytes) -> tuple[str, str]:
    """`<Code>` and `<Message>` of an S3 XML error body ("" when absent or not XML)."""
    if not body:
        return "", ""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    code = message = ""
    for child in root.iter():
        name = _local(child.tag)
        if name == "Code" and not code:
            code = (child.text or "").strip()
        elif name == "Message" and not message:
            message = (child.text or "").strip()
    return code, message


# --- signing -----------------------------------------------------------------------------------


def _quote(value: str, safe: str) -> str:
    return urllib.parse.quote(value, safe=safe)


def canonical_query(params: Mapping[str, str]) -> str:
    """SigV4 canonical query: names and values percent-encoded (RFC 3986), sorted."""
    pairs = sorted((_quote(k, _UNRESERVED), _quote(v, _UNRESERVED)) for k, v in params.items())
    return "&".join(f"{k}={v}" for k, v in pairs)


class Signer:
    """SigV4 for S3 requests. Thread-safe (the key cache is one tuple)."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._key: tuple[str, str, bytes] = ("", "", b"")

    def _signing_key(self, secret: str, day: str) -> bytes:
        cached_secret, cached_day, key = self._key
        if cached_secret == secret and cached_day == day:
            return key
        key = _hmac(("AWS4" + secret).encode(), day)
        for part in (self.region, "s3", "aws4_request"):
            key = _hmac(key, part)
        self._key = (secret, day, key)
        return key

    def sign(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        credentials: botocore.credentials.ReadOnlyCredentials,
        now: float | None = None,
        payload_hash: str = EMPTY_SHA256,
    ) -> None:
        """Add x-amz-date, x-amz-content-sha256, the token and Authorization to `headers`.

        `headers` has lowercase names and must hold `host`; every header in it is signed.
        `path` and `query` are exactly as sent (already percent-encoded). `payload_hash` is
        the empty body's SHA-256 (no body) or UNSIGNED_PAYLOAD (a body sent unhashed).
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = stamp[:8]
        headers["x-amz-date"] = stamp
        headers["x-amz-content-sha256"] = payload_hash
        if credentials.token:
            headers["x-amz-security-token"] = credentials.token
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join(
            (
                method,
                path,
                query,
                "".join(f"{n}:{' '.join(headers[n].split())}\n" for n in names),
                signed,
                payload_hash,
            )
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = (
            f"{_ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        signature = hmac.new(
            self._signing_key(credentials.secret_key or "", day), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        headers["authorization"] = (
            f"{_ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


# --- addressing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """Where requests for one bucket go: `base` (scheme://host[:port]) and the path prefix
    before the key ("/bucket/" path style, "/" virtual-hosted)."""

    base: str
    path_prefix: str


def address_for(
    bucket: str, region: str, client_endpoint: str, custom_endpoint: bool
) -> Address | None:
    """The address botocore would use, or None where this path does not know it.

    A custom endpoint (StoreOptions.endpoint_url or AWS_ENDPOINT_URL*) is path style, as the
    S3 store configures botocore. AWS's own endpoint is virtual-hosted
    (`https://BUCKET.s3.REGION.amazonaws.com`), path style for bucket names with dots (their
    virtual host names do not match the wildcard certificate). FIPS, dual-stack and other
    partitions' endpoints are left to botocore (None).
    """
    parts = urllib.parse.urlsplit(client_endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname
    if not custom_endpoint and _AWS_HOST.match(host):
        if parts.scheme != "https":
            return None
        if "." in bucket:
            return Address(f"https://s3.{region}.amazonaws.com", f"/{bucket}/")
        return Address(f"https://{bucket}.s3.{region}.amazonaws.com", "/")
    if not custom_endpoint and host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        return None
    base = f"{parts.scheme}://{parts.netloc}"
    root = parts.path.rstrip("/")
    return Address(base, f"{_quote(root, '/~')}/{bucket}/")


# --- the client --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileSpan:
    """`length` bytes at `offset` of the file `fd`: a request body sent unsigned, with
    sendfile(2) over http (`_SendfileConnection`), in 1 MiB preads over https."""

    fd: int
    offset: int
    length: int

    def chunks(self) -> Iterator[bytes]:
        return file_chunks(self.fd, self.offset, self.length)


# A request body: bytes (signed with their SHA-256), a span of a file or a maker of its
# chunks (both unsigned).
Body = bytes | FileSpan | Callable[[], Iterator[bytes]] | None


class _SendfileConnection(urllib3.connection.HTTPConnection):
    """A plain-http connection that sends a `FileSpan` body with sendfile(2): the kernel
    hands the file's cached pages to the socket, instead of one pread copy into Python
    and one more copy into the socket per byte (`bench/README.md`, "Write-path CPU")."""

    def send(self, data: Any) -> None:
        if not isinstance(data, FileSpan):
            super().send(data)
            return
        sock = self.sock
        assert sock is not None  # urllib3 sends the body after the headers, connected
        sent = send_file(sock, data.fd, data.offset, data.length)
        while sent < data.length:  # the file shrank under the part: zeros, as PartView
            count = min(_CHUNK, data.length - sent)
            sock.sendall(bytes(count))
            sent += count


def send_file(sock: socket.socket, fd: int, offset: int, length: int) -> int:
    """sendfile(2) of up to `length` bytes at `offset` of `fd` to `sock`, within the
    socket's timeout per wait; the bytes sent (fewer at the end of the file)."""
    timeout = sock.gettimeout()
    out = sock.fileno()
    sent = 0
    with selectors.PollSelector() as selector:
        selector.register(out, selectors.EVENT_WRITE)
        while sent < length:
            try:
                count = os.sendfile(out, fd, offset + sent, length - sent)
            except BlockingIOError:
                if not selector.select(timeout):
                    raise TimeoutError("timed out sending a request body") from None
                continue
            if count == 0:
                break
            sent += count
    return sent


class _SendfilePool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _SendfileConnection


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: Any  # urllib3's HTTPHeaderDict: case-insensitive names
    body: bytes
    filled: bool = False  # the body went into the caller's buffer (`into`), not `body`


def _receive(response: Any, into: memoryview, where: str) -> _Reply:
    """Finish an answer sent without preloading: a 206 of exactly `len(into)` bytes is read
    straight into `into` (http.client's readinto, one copy from the socket); any other answer
    is read as bytes. Errors while reading are raised as botocore's (retried as such), and
    a connection whose body was not read to its end is closed, never reused."""
    complete = False
    try:
        fp = getattr(response, "_fp", None)  # urllib3 keeps http.client's response here
        length = response.headers.get("content-length")
        if (
            response.status == 206
            and response.headers.get("content-range")
            and isinstance(fp, http.client.HTTPResponse)
            and length is not None
            and length.isdigit()
            and int(length) == len(into)
        ):
            view = into
            while view:
                n = fp.readinto(view)
                if not n:
                    raise urllib3.exceptions.ProtocolError(
                        f"connection closed after {len(into) - len(view)} of {len(into)} bytes"
                    )
                view = view[n:]
            complete = True
            return _Reply(response.status, response.headers, b"", filled=True)
        data = response.read()
        complete = True
        return _Reply(response.status, response.headers, data)
    except (TimeoutError, urllib3.exceptions.ReadTimeoutError) as exc:
        raise botocore.exceptions.ReadTimeoutError(endpoint_url=where, error=exc) from exc
    except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError) as exc:
        raise botocore.exceptions.ConnectionClosedError(error=exc, endpoint_url=where) from exc
    finally:
        if not complete:
            response.close()
        response.release_conn()


class LeanS3:
    """GET, HEAD, ListObjectsV2 and the multipart upload requests on one bucket; see the
    module docstring."""

    def __init__(
        self,
        *,
        address: Address,
        region: str,
        credentials: botocore.credentials.Credentials | None,
        attempts: int,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int,
        ca_bundle: str | None,
        user_agent: str,
    ) -> None:
        self.address = address
        self._credentials = credentials
        self._signer = Signer(region)
        self._attempts = attempts
        self._host = urllib.parse.urlsplit(address.base).netloc
        self._https = address.base.startswith("https:")
        self._user_agent = f"poolfs-lean {user_agent}"
        options = [*urllib3.connection.HTTPConnection.default_socket_options]
        options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        pool_args: dict[str, Any] = {
            "maxsize": pool_size,
            "timeout": urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            "retries": False,
            "socket_options": options,
        }
        self._pool: urllib3.connectionpool.HTTPConnectionPool
        if self._https:
            pool_args["cert_reqs"] = "CERT_REQUIRED"
            pool_args["ca_certs"] = ca_bundle
            self._pool = urllib3.connectionpool.connection_from_url(address.base, **pool_args)
        else:
            where = urllib3.util.parse_url(address.base)
            assert where.host is not None
            self._pool = _SendfilePool(where.host, where.port, **pool_args)

    def close(self) -> None:
        self._pool.close()

    # --- requests --------------------------------------------------------------------------

    def head(self, s3key: str, if_match: str | None) -> dict[str, Any]:
        """HeadObject; botocore's response shape (ETag, ContentLength, LastModified, Metadata
        and the content headers a copy keeps)."""
        headers = {} if if_match is None else {"if-match": if_match}
        reply = self._request("HeadObject", "HEAD", s3key, {}, headers)
        return self._object_fields(reply.headers)

    def get(
        self,
        s3key: str,
        range_header: str,
        if_match: str | None,
        into: memoryview | None = None,
    ) -> tuple[bytes | memoryview, dict[str, Any]]:
        """GetObject of a range; the body and botocore's response shape (with ContentRange).

        With `into` (a writable buffer of the range's length), a 206 answer of exactly that
        length is received straight into it and `into` itself is returned as the body (one
        copy, into memory that is already mapped); any other answer comes back as new bytes.
        """
        headers = {"range": range_header}
        if if_match is not None:
            headers["if-match"] = if_match
        reply = self._request("GetObject", "GET", s3key, {}, headers, into=into)
        fields = self._object_fields(reply.headers)
        content_range = reply.headers.get("content-range")
        if content_range:
            fields["ContentRange"] = content_range
        return (into if reply.filled and into is not None else reply.body), fields

    def list_page(
        self, prefix: str, delimiter: str | None, token: str | None, max_keys: int
    ) -> ListResult:
        """One ListObjectsV2 page below `prefix` (an S3 key prefix), keys url-decoded."""
        params = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys)}
        params["encoding-type"] = "url"
        if delimiter:
            params["delimiter"] = delimiter
        if token is not None:
            params["continuation-token"] = token
        return parse_list_page(self._request("ListObjectsV2", "GET", None, params, {}).body)

    def upload_part(
        self, s3key: str, upload_id: str, number: int, fd: int, offset: int, length: int
    ) -> dict[str, Any]:
        """UploadPart of `length` bytes at `offset` of `fd`; botocore's shape (`ETag`)."""
        body = FileSpan(fd, offset, length)
        headers = self._body_headers(length, body.chunks)
        params = {"partNumber": str(number), "uploadId": upload_id}
        reply = self._request("UploadPart", "PUT", s3key, params, headers, body)
        return {"ETag": reply.headers.get("etag", "")}

    def put_object(
        self,
        s3key: str,
        metadata: Mapping[str, str],
        length: int,
        body: FileSpan | Callable[[], Iterator[bytes]],
    ) -> dict[str, Any]:
        """PutObject of `body`, `length` bytes (a span of a file, or the chunks a callable
        makes once per attempt and once more for the checksum over http), with user
        `metadata`; botocore's shape (`ETag`, and the reply's headers in
        `ResponseMetadata.HTTPHeaders`)."""
        headers = _meta_headers(metadata)
        headers.update(
            self._body_headers(length, body.chunks if isinstance(body, FileSpan) else body)
        )
        reply = self._request("PutObject", "PUT", s3key, {}, headers, body)
        return {"ETag": reply.headers.get("etag", ""), "ResponseMetadata": _metadata(reply.headers)}

    def _body_headers(self, length: int, chunks: Callable[[], Iterator[bytes]]) -> dict[str, str]:
        """Content-Length, and over http the CRC32 of the body (see the module docstring)."""
        headers = {"content-length": str(length)}
        if not self._https:
            crc = 0
            for chunk in chunks():
                crc = crc32(chunk, crc)
            headers["x-amz-checksum-crc32"] = base64.b64encode(crc.to_bytes(4, "big")).decode()
        return headers

    def create_upload(self, s3key: str, metadata: Mapping[str, str]) -> str:
        """CreateMultipartUpload with user `metadata`; the upload id."""
        reply = self._request(
            "CreateMultipartUpload", "POST", s3key, {"uploads": ""}, _meta_headers(metadata), b""
        )
        upload_id = _xml_field(reply.body, "UploadId")
        if not upload_id:
            raise Unsupported("CreateMultipartUpload answer without an UploadId", 200)
        return upload_id

    def complete_upload(
        self, s3key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> dict[str, Any]:
        """CompleteMultipartUpload of (number, ETag) `parts`; botocore's shape (`ETag`, and
        the reply's `date` in `ResponseMetadata.HTTPHeaders`).

        A 200 answer whose body is an S3 `<Error>` (the server failed after it started to
        answer) is an error, retried as a 500 as botocore does.
        """
        listed = "".join(
            f"<Part><ETag>{_xml_text(etag)}</ETag><PartNumber>{number}</PartNumber></Part>"
            for number, etag in parts
        )
        document = (
            '<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"{listed}</CompleteMultipartUpload>"
        ).encode()
        reply = self._request(
            "CompleteMultipartUpload",
            "POST",
            s3key,
            {"uploadId": upload_id},
            {"content-type": "application/xml"},
            body=document,
        )
        etag = _xml_field(reply.body, "ETag")
        if not etag:
            raise Unsupported("CompleteMultipartUpload answer without an ETag", 200)
        return {"ETag": etag, "ResponseMetadata": _metadata(reply.headers)}

    def abort_upload(self, s3key: str, upload_id: str) -> None:
        """AbortMultipartUpload."""
        self._request("AbortMultipartUpload", "DELETE", s3key, {"uploadId": upload_id}, {})

    @staticmethod
    def _object_fields(headers: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"ETag": headers.get("etag", "")}
        length = headers.get("content-length")
        if length is not None:
            fields["ContentLength"] = int(length)
        modified = headers.get("last-modified")
        if modified:
            fields["LastModified"] = http_date(modified)
        metadata: dict[str, str] = {}
        cut = len(_META_PREFIX)
        for name in headers:
            lower = name.lower()
            if lower.startswith(_META_PREFIX):
                metadata[name[cut:]] = headers[name]
            elif lower in KEPT_HEADERS:
                fields[KEPT_HEADERS[lower]] = headers[name]
        fields["Metadata"] = metadata
        return fields

    def _request(
        self,
        operation: str,
        method: str,
        s3key: str | None,
        params: Mapping[str, str],
        headers: dict[str, str],
        body: Body = None,
        into: memoryview | None = None,
    ) -> _Reply:
        """Send with retries; the 2xx answer, else raise.

        `body`: bytes are sent signed with their SHA-256; a `FileSpan`, or a callable making
        the request body anew for each attempt, as `UNSIGNED-PAYLOAD`. `into`: see `get`.
        """
        path = self.address.path_prefix
        if s3key is not None:
            path += _quote(s3key, "/~")
        query = canonical_query(params) if params else ""
        url = f"{path}?{query}" if query else path
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = self._send(method, path, query, url, headers, body, into)
            except botocore.exceptions.BotoCoreError as exc:
                if attempt < self._attempts and isinstance(
                    exc, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError
                ):
                    time.sleep(
                        random.random() * min(_OTHER_SCALE * 2 ** (attempt - 1), _MAX_BACKOFF)
                    )
                    continue
                raise
            status = reply.status
            if status == 200 and operation in _ERRORS_IN_200 and _is_error_document(reply.body):
                status = 500  # an error sent after the 200 (botocore's _handle_200_error)
            if 200 <= status < 300:
                return reply
            error = self._error(operation, method, status, reply.headers, reply.body)
            code = error.response["Error"]["Code"]
            throttled = code in THROTTLING_CODES
            if attempt < self._attempts and (
                throttled or status in TRANSIENT_STATUS or code in TRANSIENT_CODES
            ):
                scale = _THROTTLING_SCALE if throttled else _OTHER_SCALE
                time.sleep(random.random() * min(scale * 2 ** (attempt - 1), _MAX_BACKOFF))
                continue
            raise error

    def _send(
        self,
        method: str,
        path: str,
        query: str,
        url: str,
        headers: dict[str, str],
        body: Body = None,
        into: memoryview | None = None,
    ) -> _Reply:
        if self._credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        credentials = self._credentials.get_frozen_credentials()
        signed = {"host": self._host, **headers}
        sent: bytes | Iterable[Any] | None
        if body is None:
            payload, sent = EMPTY_SHA256, None
        elif isinstance(body, bytes):
            payload, sent = hashlib.sha256(body).hexdigest(), body
            signed["content-length"] = str(len(body))
        elif isinstance(body, FileSpan):
            # _SendfileConnection.send takes the span whole; over https, 1 MiB preads.
            payload, sent = UNSIGNED_PAYLOAD, body.chunks() if self._https else (body,)
        else:
            payload, sent = UNSIGNED_PAYLOAD, body()
        self._signer.sign(method, path, query, signed, credentials, payload_hash=payload)
        signed["user-agent"] = self._user_agent
        where = self.address.base + url
        try:
            response = self._pool.urlopen(
                method,
                url,
                body=cast(Any, sent),  # a FileSpan chunk is for _SendfileConnection.send
                headers=signed,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=into is None,
                decode_content=False,
            )
        except urllib3.exceptions.SSLError as exc:
            raise botocore.exceptions.SSLError(endpoint_url=where, error=exc) from exc
        except (urllib3.exceptions.NewConnectionError, socket.gaierror) as exc:
            raise botocore.exceptions.EndpointConnectionError(
                endpoint_url=where, error=exc
            ) from exc
        except urllib3.exceptions.ConnectTimeoutError as exc:
            raise botocore.exceptions.ConnectTimeoutError(endpoint_url=where, error=exc) from exc
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=where, error=exc) from exc
        except urllib3.exceptions.ProtocolError as exc:
            raise botocore.exceptions.ConnectionClosedError(error=exc, endpoint_url=where) from exc
        except Exception as exc:
            raise botocore.exceptions.HTTPClientError(error=exc) from exc
        if into is not None:
            return _receive(response, into, where)
        return _Reply(response.status, response.headers, response.data)

    @staticmethod
    def _error(
        operation: str, method: str, status: int, headers: Any, body: bytes
    ) -> botocore.exceptions.ClientError:
        if 300 <= status < 400:
            raise Unsupported(f"HTTP {status} redirect", status)
        if method == "PUT" and status in (400, 501):
            # The checksum header or the unsigned payload refused, or BadDigest (the part
            # changed between its checksum and its sending): botocore sends it signed.
            # RequestTimeout (400: the body came too slowly) is retried here as by botocore.
            code = _error_fields(body)[0] or str(status)
            if (
                code not in TRANSIENT_CODES
                and code not in THROTTLING_CODES
                and code not in _REFUSED_WHOEVER_SENDS
            ):
                raise Unsupported(f"HTTP {status} {code} to an unsigned part", status, code)
        if method == "HEAD":
            if status == 400:
                raise Unsupported("HTTP 400 to HEAD (no body to tell why)", status)
            code, message = str(status), _reason(status)
        else:
            code, message = _error_fields(body)
            if not code:
                code, message = str(status), _reason(status)
            if code in _REDIRECT_CODES:
                raise Unsupported(f"HTTP {status} {code}", status, code)
            if code == "SignatureDoesNotMatch":
                # Wrong secret, or a request this signer encodes differently from botocore:
                # botocore decides (and raises Denied for a wrong secret).
                raise Unsupported(f"HTTP {status} {code}", status, code)
        response: Any = {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": dict(headers)},
        }
        return botocore.exceptions.ClientError(response, operation)


def _xml_field(body: bytes, name: str) -> str:
    """The text of the first element called `name` in an XML answer ("" when absent)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return ""
    for element in root.iter():
        if _local(element.tag) == name:
            return (element.text or "").strip()
    return ""


def _is_error_document(body: bytes) -> bool:
    """Whether an answer's body is an S3 `<Error>` document."""
    head = body[:512].lstrip()
    if head.startswith(b"<?xml"):
        head = head[head.find(b"?>") + 2 :].lstrip()
    return head.startswith(b"<Error>") or head.startswith(b"<Error ")


def _meta_headers(metadata: Mapping[str, str]) -> dict[str, str]:
    """User metadata as `x-amz-meta-*` headers. Anything but plain printable ASCII raises
    Unsupported with status 0 (nothing was sent): botocore decides (it refuses non-ASCII)."""
    headers = {}
    for name, value in metadata.items():
        header = _META_PREFIX + name.lower()
        if not (_printable(header) and _printable(value)) or header in headers:
            raise Unsupported(f"metadata {name!r} is not a plain ASCII header", 0)
        headers[header] = value
    return headers


def _metadata(headers: Any) -> dict[str, Any]:
    """botocore's `ResponseMetadata` of an answer: its headers, names in lowercase."""
    return {"HTTPHeaders": {name.lower(): value for name, value in headers.items()}}


def _xml_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable()


_CHUNK = 1024 * 1024


class PartView:
    """A read-only, seekable file view of `length` bytes at `offset` of `fd`: the body of one
    part, for the lean path (`file_chunks`) and for botocore's UploadPart alike.

    Bytes missing because the file shrank under the part (a streamed upload whose file was
    truncated; that part is stale and sent again) are read as zeros, so the server gets the
    Content-Length announced instead of waiting for bytes until it times out.
    """

    # botocore sizes the body with len(), streams it with read() and rewinds it with
    # seek(0) before a retry; positions are relative to the part.

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd = fd
        self._offset = offset
        self._length = length
        self._pos = 0

    def __len__(self) -> int:
        return self._length - self._pos

    def read(self, amount: int = -1) -> bytes:
        left = self._length - self._pos
        if amount < 0 or amount > left:
            amount = left
        data = os.pread(self._fd, amount, self._offset + self._pos)
        if len(data) < amount:
            data += bytes(amount - len(data))
        self._pos += len(data)
        return data

    def seek(self, where: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, min(self._length, base + where))
        return self._pos

    def tell(self) -> int:
        return self._pos


def file_chunks(fd: int, offset: int, length: int) -> Iterator[bytes]:
    """`length` bytes of `fd` at `offset` in 1 MiB preads (`PartView`)."""
    view = PartView(fd, offset, length)
    while chunk := view.read(_CHUNK):
        yield chunk


def _reason(status: int) -> str:
    return http.client.responses.get(status, "")
