"""One storage interface for every stage: `str` URIs that are local paths or `s3://bucket/key`. boto3 is used here only.

URIs:
    - a local path, relative or absolute: `data/synthetic/pool/a.jpg`;
    - an S3 object or prefix: `s3://bucket/prefix/a.jpg` (S3 has no folders: a prefix with no object under it is
      reported as not found, as a missing local folder is);
    - a member of an uncompressed tar shard, local or on S3: `<shard>.tar::<member name>@<offset>:<size>`, where
      offset is the byte offset of the member's data in the shard and size its length. The offset makes the member
      readable with one seek (local) or one ranged GET (S3), without scanning the shard again.

S3 settings come only from boto3's standard sources: credentials from the environment or an AWS profile, the endpoint
from `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`; boto3 reads both natively), retries in botocore's `standard` mode
with 5 attempts unless `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` say otherwise. Nothing here runs at import.

Errors are `StorageError` (an `OSError`) whose message starts with the URI; a missing local folder, bucket, prefix or
object is a `StorageNotFoundError`, also a `FileNotFoundError`.
"""

from __future__ import annotations

import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

S3_SCHEME = "s3://"
TAR_SUFFIX = ".tar"
TAR_MEMBER_SEP = "::"
# Non-greedy shard (up to the first `.tar::`), greedy member name, then the last `@offset:size`: member names may
# contain `@` or `::`, shard paths are assumed not to contain `.tar::`.
_TAR_MEMBER_RE = re.compile(r"^(?P<shard>.+?\.tar)::(?P<name>.+)@(?P<offset>\d+):(?P<size>\d+)$", re.DOTALL)

_CONNECT_TIMEOUT_S = 10  # botocore's default of 60 s makes a black-holed endpoint look like a hang
_READ_TIMEOUT_S = 60
_DEFAULT_MAX_ATTEMPTS = 5
_S3_PAGE_SIZE = 1000  # list_objects_v2's maximum; tests lower it to exercise pagination


class StorageError(OSError):
    """A URI that cannot be listed, read or written; the message names the URI."""

    def __init__(self, uri: str, message: str) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri = uri


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A local folder or file, an S3 bucket, prefix or object that does not exist."""


# --------------------------------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    """True for `s3://...` URIs (tar members of S3 shards included)."""
    return uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """Splits `s3://bucket/key` into (bucket, key); the key may be empty."""
    if not is_s3(uri):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket name")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Joins path parts onto a local path or an S3 URI (always with `/` on S3)."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def normalize(uri: str) -> str:
    """A canonical spelling of a folder or prefix: no trailing slash, `a/./b` collapsed for local paths."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"{S3_SCHEME}{bucket}/{key}".rstrip("/")
    return os.path.normpath(uri)


def basename(uri: str) -> str:
    """The last path component (for a tar member, of the member's name)."""
    member = parse_tar_member(uri)
    name = member.name if member else uri
    return name.rstrip("/").rsplit("/", 1)[-1]


def suffix(uri: str) -> str:
    """The lower-cased file suffix, dot included (`.jpg`), of a file, object or tar member; `` if none."""
    name = basename(uri)
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


# --------------------------------------------------------------------------------------------------------------------
# Tar members
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarMember:
    """A regular file inside an uncompressed tar shard, addressed by the byte range of its data."""

    shard: str
    name: str
    offset: int
    size: int

    @property
    def uri(self) -> str:
        return f"{self.shard}{TAR_MEMBER_SEP}{self.name}@{self.offset}:{self.size}"


def is_tar_shard(uri: str) -> bool:
    """True for a `.tar` file or object (not for a member inside one)."""
    return uri.lower().endswith(TAR_SUFFIX) and not is_tar_member(uri)


def is_tar_member(uri: str) -> bool:
    return parse_tar_member(uri) is not None


def parse_tar_member(uri: str) -> TarMember | None:
    """Parses `<shard>.tar::<name>@<offset>:<size>`; None for any other URI."""
    if TAR_MEMBER_SEP not in uri:
        return None
    m = _TAR_MEMBER_RE.match(uri)
    if m is None:
        return None
    return TarMember(m["shard"], m["name"], int(m["offset"]), int(m["size"]))


def list_tar_members(uri: str) -> list[TarMember]:
    """The regular-file members of an uncompressed tar shard, in archive order.

    A local shard is indexed from its headers (seeking over the data); an S3 shard is streamed once. Directories,
    links and devices are skipped. A compressed or corrupt shard raises StorageError.
    """
    try:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with _s3_errors(uri):
                body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
            # Stream mode ("r|") never seeks; offset_data is still the member's position in the byte stream.
            with _s3_errors(uri), body, tarfile.open(fileobj=body, mode="r|") as tar:
                return [TarMember(uri, m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        if not os.path.isfile(uri):
            raise StorageNotFoundError(uri, "no such tar shard")
        # "r:" refuses compressed archives, whose offsets would not be byte offsets in the file.
        with tarfile.open(uri, mode="r:") as tar:
            return [TarMember(uri, m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
    except tarfile.TarError as err:
        raise StorageError(uri, f"not a readable uncompressed tar shard: {err}") from err


# --------------------------------------------------------------------------------------------------------------------
# S3 client
# --------------------------------------------------------------------------------------------------------------------

_CLIENTS: dict[tuple[Any, ...], Any] = {}


def s3_client() -> Any:
    """A boto3 S3 client for this process and the current AWS_* environment.

    Cached per process id (clients must not cross a fork) and per AWS_* environment (tests and users may point at
    another endpoint or profile without restarting).
    """
    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (os.getpid(), aws_env)
    client = _CLIENTS.get(key)
    if client is None:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={
                "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                # total attempts, first included: the meaning of AWS_MAX_ATTEMPTS (botocore's max_attempts excludes it)
                "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", _DEFAULT_MAX_ATTEMPTS)),
            },
            connect_timeout=_CONNECT_TIMEOUT_S,
            read_timeout=_READ_TIMEOUT_S,
            max_pool_connections=32,
        )
        # The endpoint (AWS_ENDPOINT_URL), region and credentials are resolved by boto3 itself.
        client = boto3.session.Session().client("s3", config=config)
        _CLIENTS.clear()  # one live client per process is enough; drop those of an old environment
        _CLIENTS[key] = client
    return client


def _endpoint() -> str:
    try:
        return s3_client().meta.endpoint_url
    except Exception:  # the endpoint only decorates an error message
        return "<unknown endpoint>"


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turns botocore's exceptions into StorageErrors that name the URI and say what to check."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    try:
        yield
    except ClientError as err:
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            raise StorageNotFoundError(uri, f"bucket does not exist (endpoint {_endpoint()})") from err
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            raise StorageNotFoundError(uri, "no such object") from err
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
            raise StorageError(uri, f"access denied ({code}): check the AWS credentials or profile") from err
        raise StorageError(uri, f"S3 error {code or status}: {error.get('Message', err)}") from err
    except (NoCredentialsError, PartialCredentialsError) as err:
        raise StorageError(
            uri, f"no usable AWS credentials ({err}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        ) from err
    except BotoCoreError as err:
        # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ... after botocore's retries.
        raise StorageError(uri, f"cannot reach S3 at {_endpoint()}: {err}") from err


# --------------------------------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------------------------------


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """The files under a local folder or the objects under an S3 prefix, sorted.

    Args:
        uri: A local folder or `s3://bucket/prefix`.
        recursive: Descend into sub-folders (on S3: keys with further `/`).

    Returns:
        Full URIs of the files (local paths keep the spelling of `uri`); tar shards are returned as files.

    Raises:
        StorageNotFoundError: The folder does not exist, or the bucket does not or the prefix holds no object.
        StorageError: The path is not a folder, or the bucket cannot be reached.
    """
    if is_s3(uri):
        return _list_s3(uri, recursive)
    root = Path(uri)
    if not root.exists():
        raise StorageNotFoundError(uri, "no such folder")
    if not root.is_dir():
        raise StorageError(uri, "not a folder")
    if not recursive:
        return sorted(os.path.join(uri, e.name) for e in os.scandir(uri) if e.is_file())
    files: list[str] = []
    seen_dirs: set[str] = set()

    def _raise(err: OSError) -> None:
        raise StorageError(err.filename or uri, f"cannot list: {err.strerror or err}") from err

    # Follow links (data folders are often symlinked to a big disk) but never visit a real folder twice.
    for dirpath, dirnames, filenames in os.walk(uri, onerror=_raise, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        files.extend(os.path.join(dirpath, name) for name in filenames)
    return sorted(files)


def _list_s3(uri: str, recursive: bool) -> list[str]:
    bucket, key = split_s3(uri)
    prefix = key if not key or key.endswith("/") else key + "/"
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if not recursive:
        kwargs["Delimiter"] = "/"
    files: list[str] = []
    with _s3_errors(uri):
        pages = (
            s3_client()
            .get_paginator("list_objects_v2")
            .paginate(**kwargs, PaginationConfig={"PageSize": _S3_PAGE_SIZE})
        )
        for page in pages:
            # Keys ending in "/" are the empty "folder" markers some tools create, not files.
            files.extend(
                f"{S3_SCHEME}{bucket}/{obj['Key']}" for obj in page.get("Contents", ()) if obj["Key"][-1] != "/"
            )
    if not files:
        raise StorageNotFoundError(uri, "no objects under this prefix")
    return sorted(files)


def read_bytes(uri: str) -> bytes:
    """The whole content of a local file, an S3 object or a tar member."""
    member = parse_tar_member(uri)
    if member is not None:
        return read_range(member.shard, member.offset, member.size)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as err:
        raise StorageNotFoundError(uri, "no such file") from err


def read_range(uri: str, offset: int, size: int) -> bytes:
    """`size` bytes from `offset` of a local file or S3 object (one seek, or one ranged GET).

    Raises:
        StorageError: Fewer bytes than asked for (a truncated shard).
    """
    if size == 0:
        return b""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            obj = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")
            data = obj["Body"].read()
    else:
        try:
            with open(uri, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except FileNotFoundError as err:
            raise StorageNotFoundError(uri, "no such file") from err
    if len(data) != size:
        raise StorageError(uri, f"short read: {len(data)} of {size} bytes at offset {offset}")
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """Writes a local file or S3 object; a local file appears complete or not at all.

    Locally the bytes go to a hidden temporary file in the same folder, are flushed to disk and renamed over the
    target, so a reader (or DVC) never sees a half-written file. An S3 PUT is atomic by itself.
    """
    if is_tar_member(uri):
        raise StorageError(uri, "tar members are read-only")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(uri: str) -> bool:
    """True if the local path, S3 object (or, for a tar member, its shard) exists.

    Raises:
        StorageError: The bucket cannot be reached or access is denied (a missing bucket is False).
    """
    member = parse_tar_member(uri)
    if member is not None:
        return exists(member.shard)
    if not is_s3(uri):
        return os.path.exists(uri)
    bucket, key = split_s3(uri)
    try:
        with _s3_errors(uri):
            if not key:
                s3_client().head_bucket(Bucket=bucket)
            else:
                s3_client().head_object(Bucket=bucket, Key=key)
    except StorageNotFoundError:
        return False
    return True
