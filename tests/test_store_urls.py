"""Store URLs: what parses to what, what is refused and with which reason, and which store
class each scheme opens (without I/O)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from poolfs.stores import InvalidStoreURL, StoreOptions, StoreURL, open_store, parse_store_url
from poolfs.stores.file import FileStore
from poolfs.stores.mem import MemStore
from poolfs.stores.s3 import S3Store

pytestmark = pytest.mark.core


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bkt", StoreURL("s3", "bkt", "")),
        ("s3://bkt/", StoreURL("s3", "bkt", "")),
        ("s3://bkt/pools", StoreURL("s3", "bkt", "pools/")),
        ("s3://bkt/a/b", StoreURL("s3", "bkt", "a/b/")),
        ("s3://bkt/a/b/", StoreURL("s3", "bkt", "a/b/")),
        ("S3://bkt/a", StoreURL("s3", "bkt", "a/")),
        ("s3://my.bucket-1/x", StoreURL("s3", "my.bucket-1", "x/")),
        # S3 prefixes are taken literally (as the AWS CLI does): no %-decoding.
        ("s3://bkt/a b/%41", StoreURL("s3", "bkt", "a b/%41/")),
        ("s3://bkt/\u00fc", StoreURL("s3", "bkt", "\u00fc/")),
        ("file:///srv/pools", StoreURL("file", "/srv/pools", "")),
        ("file:///srv/pools/", StoreURL("file", "/srv/pools", "")),
        ("file://localhost/srv/pools", StoreURL("file", "/srv/pools", "")),
        ("file:///srv/my%20pools", StoreURL("file", "/srv/my pools", "")),
        ("file:///srv//pools", StoreURL("file", "/srv/pools", "")),
        ("mem://test", StoreURL("mem", "test", "")),
        ("mem://a_b.c-9", StoreURL("mem", "a_b.c-9", "")),
        ("MEM://x", StoreURL("mem", "x", "")),
    ],
)
def test_good_urls(url: str, expected: StoreURL) -> None:
    parsed = parse_store_url(url)
    assert parsed == expected
    assert parse_store_url(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "empty store URL"),
        ("bkt/prefix", "no scheme"),
        ("/srv/pools", "no scheme"),
        ("ftp://host/x", "unsupported scheme 'ftp'"),
        ("http://host/x", "unsupported scheme 'http'"),
        ("s3://", "missing bucket name"),
        ("s3:///prefix", "missing bucket name"),
        ("s3://Bucket/x", "'Bucket' is not a valid S3 bucket name"),
        ("s3://ab/x", "'ab' is not a valid S3 bucket name"),
        ("s3://bkt_1/x", "'bkt_1' is not a valid S3 bucket name"),
        ("s3://-bkt/x", "'-bkt' is not a valid S3 bucket name"),
        ("s3://a..b/x", "'a..b' is not a valid S3 bucket name"),
        ("s3://" + "a" * 64 + "/x", "is not a valid S3 bucket name"),
        ("s3://bkt:9000/x", "'bkt:9000' is not a valid S3 bucket name"),
        ("s3://user@bkt/x", "'user@bkt' is not a valid S3 bucket name"),
        ("s3://bkt/a//b", "empty, '.' or '..' segment"),
        ("s3://bkt/a/./b", "empty, '.' or '..' segment"),
        ("s3://bkt/a/../b", "empty, '.' or '..' segment"),
        ("s3://bkt/x?versionId=1", "query strings and fragments are not allowed"),
        ("s3://bkt/x#frag", "query strings and fragments are not allowed"),
        ("file://srv/pools", "three slashes"),
        ("file:relative/dir", "need an absolute path"),
        ("file:///srv/../etc", "'.' or '..' segment"),
        ("file:///srv/./pools", "'.' or '..' segment"),
        ("file:///srv/%2e%2e/etc", "'.' or '..' segment"),
        ("file:///srv/pools?x=1", "query strings and fragments are not allowed"),
        ("mem://", "expected mem://NAME"),
        ("mem://bad name", "expected mem://NAME"),
        ("mem://a/b", "expected mem://NAME"),
    ],
)
def test_bad_urls_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(InvalidStoreURL, match=re.escape(problem)) as info:
        parse_store_url(url)
    if url:
        assert repr(url) in str(info.value)  # the message quotes the URL it refuses
    with pytest.raises(InvalidStoreURL):
        open_store(url)


def test_invalid_store_url_is_a_value_error() -> None:
    assert issubclass(InvalidStoreURL, ValueError)


def test_open_store_picks_the_backend_without_io() -> None:
    assert isinstance(open_store("mem://urls-test"), MemStore)
    file_store = open_store("file:///nonexistent/dir")
    assert isinstance(file_store, FileStore)
    assert file_store.url == "file:///nonexistent/dir"
    # Nothing listens on port 9: opening must not touch the network.
    options = StoreOptions(endpoint_url="http://127.0.0.1:9", region="eu-west-1")
    s3_store = open_store("s3://bkt/a/b", options)
    assert isinstance(s3_store, S3Store)
    assert (s3_store.bucket, s3_store.prefix, s3_store.url) == ("bkt", "a/b/", "s3://bkt/a/b/")
    assert s3_store.has_root_marker
    assert not open_store("s3://bkt", options).has_root_marker
    s3_store.close()


def test_boto3_is_loaded_only_for_s3_urls() -> None:
    code = (
        "import sys\n"
        "from poolfs.stores import open_store\n"
        "open_store('mem://x'); open_store('file:///tmp')\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto loaded'\n"
        "open_store('s3://bkt/p')\n"
        "assert 'boto3' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
