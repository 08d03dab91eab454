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
object is a `StorageNotFoundError`, also a `FileNotFoundError`; a local write that runs out of space is an
`OutOfSpaceError` naming the bytes needed and free (`named_write_errors`); a malformed URI (an S3 key with `..`, `.` or
empty segments, a leading `/`, control characters; a bad bucket name) is an `InvalidURIError`, also a `ValueError`.

Large files (checkpoints, exported models) move with `upload_file` / `download_file` through boto3's managed transfer
layer (s3transfer: multipart in parallel parts, each request retried by botocore, so an S3 server that restarts
mid-transfer costs a pause, not the transfer), the object visible under its key only once complete, checksummed with
S3's own SHA256 checksums where the server keeps them and with a sha256 stored in the object's metadata everywhere,
verified after download, the local file renamed into place only once verified. Credentials are never logged.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Any

from components.log import get_logger

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

log = get_logger(__name__)


class StorageError(OSError):
    """A URI that cannot be listed, read or written; the message names the URI."""

    def __init__(self, uri: str, message: str) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri = uri


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A local folder or file, an S3 bucket, prefix or object that does not exist."""


class InvalidURIError(StorageError, ValueError):
    """A URI that must not be used: an unsafe or malformed S3 key, or an invalid bucket name."""


class OutOfSpaceError(StorageError):
    """A local write that did not fit (no space left, quota exceeded); the message names the path, the bytes it needed
    and the bytes free, and what was left as it was."""


# --------------------------------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    """True for `s3://...` URIs (tar members of S3 shards included)."""
    return uri.startswith(S3_SCHEME)


# Bucket names: S3's characters (AWS also wants lower case and 3 to 63 characters; S3-compatible servers and legacy
# buckets are laxer, so only what could change the meaning of a path is refused here).
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MAX_KEY_BYTES = 1024


def split_s3(uri: str) -> tuple[str, str]:
    """Splits `s3://bucket/key` into (bucket, key), both validated; the key may be empty or end in `/` (a prefix).

    Raises:
        InvalidURIError: No or an invalid bucket name, or an unsafe key (see `validate_key`).
    """
    if not is_s3(uri):
        raise InvalidURIError(uri, "not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise InvalidURIError(uri, "no bucket name")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidURIError(uri, f"invalid bucket name {bucket!r} (up to 63 of a-z, 0-9, '.', '-', '_')")
    validate_key(key, uri)
    return bucket, key


def validate_key(key: str, uri: str | None = None) -> str:
    """Refuses S3 keys that could escape their prefix or be read as another path by an S3 server or a local mirror.

    A key may be empty (the bucket) and may end in one `/` (a prefix); otherwise it has no leading `/` (absolute),
    no empty, `.` or `..` segment, no control character, and at most 1024 bytes.

    Raises:
        InvalidURIError: Naming the URI (or the key) and the rule it breaks.
    """
    name = uri or key
    if not key:
        return key
    if key.startswith("/"):
        raise InvalidURIError(name, "S3 key is absolute (starts with '/')")
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        raise InvalidURIError(name, f"S3 key longer than {_MAX_KEY_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidURIError(name, "S3 key contains a control character")
    segments = key[:-1].split("/") if key.endswith("/") else key.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise InvalidURIError(name, f"S3 key has an empty, '.' or '..' segment: {key!r}")
    return key


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


def s3_client(*, max_attempts: int | None = None) -> Any:
    """A boto3 S3 client for this process and the current AWS_* environment.

    Cached per process id (clients must not cross a fork), per AWS_* environment (tests and users may point at
    another endpoint or profile without restarting) and per retry budget: `max_attempts` (total tries per request)
    overrides AWS_MAX_ATTEMPTS, for transfers that must outlast a server restart. Retried requests are logged.
    """
    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", _DEFAULT_MAX_ATTEMPTS))
    key = (os.getpid(), aws_env, attempts)
    client = _CLIENTS.get(key)
    if client is None:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={
                "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                # total attempts, first included: the meaning of AWS_MAX_ATTEMPTS (botocore's max_attempts excludes it)
                "total_max_attempts": attempts,
            },
            connect_timeout=_CONNECT_TIMEOUT_S,
            read_timeout=_READ_TIMEOUT_S,
            max_pool_connections=32,
        )
        # The endpoint (AWS_ENDPOINT_URL), region and credentials are resolved by boto3 itself.
        client = boto3.session.Session().client("s3", config=config)
        client.meta.events.register("needs-retry.s3", partial(_log_retry, max_attempts=attempts))
        for old in [k for k in _CLIENTS if k[:2] != key[:2]]:  # drop the clients of an old environment
            del _CLIENTS[old]
        _CLIENTS[key] = client
    return client


def _log_retry(
    attempts: int, max_attempts: int, operation: Any, response: Any = None, caught_exception: Any = None, **_: Any
) -> None:
    """A warning for each failed try that botocore's retries will repeat: a connection error or a transient server
    error (500, 502, 503, 504; throttling is retried quietly).

    Only the operation and the error are logged (never the request: its headers hold the signature)."""
    status = (response[1] or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) if response else 0
    if attempts >= max_attempts or (caught_exception is None and status not in (500, 502, 503, 504)):
        return
    error = caught_exception or f"HTTP {status}"
    log.warning("S3 %s: try %d of %d failed (%s); retrying", operation.name, attempts, max_attempts, error)


def _endpoint() -> str:
    try:
        return s3_client().meta.endpoint_url
    except Exception:  # the endpoint only decorates an error message
        return "<unknown endpoint>"


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turns botocore's exceptions into StorageErrors that name the URI and say what to check."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
    from s3transfer.exceptions import RetriesExceededError

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
        if code in ("PreconditionFailed", "412") or status == 412:
            raise StorageError(uri, "the object changed during the transfer; try again") from err
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
            raise StorageError(uri, f"access denied ({code}): check the AWS credentials or profile") from err
        raise StorageError(uri, f"S3 error {code or status}: {error.get('Message', err)}") from err
    except (NoCredentialsError, PartialCredentialsError) as err:
        raise StorageError(
            uri, f"no usable AWS credentials ({err}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        ) from err
    except (BotoCoreError, RetriesExceededError) as err:
        # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ... after botocore's retries; a body that
        # broke mid-stream on every try of a ranged GET.
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
    with _atomic_file(Path(uri)) as f:
        f.write(data)


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


def delete(uri: str) -> None:
    """Removes a local file or an S3 object; one that is not there is no error.

    Raises:
        StorageError: The bucket cannot be reached or access is denied.
    """
    if is_tar_member(uri):
        raise StorageError(uri, "tar members are read-only")
    if not is_s3(uri):
        Path(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise InvalidURIError(uri, "a delete needs an object key, not a bucket or prefix")
    with _s3_errors(uri):
        s3_client().delete_object(Bucket=bucket, Key=key)


def copy(source: str, target: str) -> None:
    """Copies a local file to a local path (atomically), or an S3 object to another key of the same server: a
    server-side copy (boto3's managed copy, in parts for large objects), no bytes through this machine.

    Raises:
        StorageNotFoundError: No such file or object.
        StorageError: One URI is on S3 and the other is not, or the copy failed after its retries.
    """
    if is_s3(source) != is_s3(target):
        raise StorageError(target, f"copy from {source}: both on S3 or both local (upload or download instead)")
    if not is_s3(source):
        if not Path(source).is_file():
            raise StorageNotFoundError(source, "no such file")
        _copy_local(Path(source), Path(target), None)
        return
    (src_bucket, src_key), (bucket, key) = split_s3(source), split_s3(target)
    with _s3_errors(source):
        s3_client().copy({"Bucket": src_bucket, "Key": src_key}, bucket, key)


# --------------------------------------------------------------------------------------------------------------------
# Large files: managed transfers (s3transfer) with verified checksums
# --------------------------------------------------------------------------------------------------------------------

SHA256_METADATA = "sha256"
"""Object metadata key (`x-amz-meta-sha256`) holding the hex sha256 of the whole object, written by `upload_file`."""
MiB = 1024 * 1024


@dataclass(frozen=True)
class TransferConfig:
    """How `upload_file` and `download_file` split and retry a transfer (boto3's transfer layer does the work).

    Attributes:
        part_size: Bytes per multipart part and per ranged GET (S3 requires at least 5 MiB for all but the last part;
            s3transfer raises it for files beyond S3's 10,000 parts).
        multipart_threshold: Files up to this size move in a single request.
        max_concurrency: Requests in flight at once.
        max_attempts: Tries per request (botocore's `standard` retries: connection errors, throttling, 5xx), and per
            ranged GET whose body breaks mid-stream. Each wait is random up to 2^try seconds, capped at 20 s: ten tries
            wait about a minute in all, which outlasts a restart of the S3 server.
    """

    part_size: int = 16 * MiB  # measured on SeaweedFS: 8-64 MiB parts are all within noise; 16 keeps a retry cheap
    multipart_threshold: int = 16 * MiB
    max_concurrency: int = 8
    max_attempts: int = 10

    def __post_init__(self) -> None:
        if self.part_size < 5 * MiB:
            raise ValueError(f"part_size must be at least 5 MiB (S3's minimum), got {self.part_size}")
        if self.max_concurrency < 1 or self.max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be at least 1")

    def manager(self) -> Any:
        """An s3transfer `TransferManager` on a client with this retry budget (close it, or use it in `with`)."""
        from s3transfer.manager import TransferConfig as S3TransferConfig
        from s3transfer.manager import TransferManager

        config = S3TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.part_size,
            max_request_concurrency=self.max_concurrency,
            num_download_attempts=self.max_attempts,
        )
        return TransferManager(s3_client(max_attempts=self.max_attempts), config)


ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just sent or received, from worker threads (keep it thread-safe and quick); a
request that is retried first reports its bytes again as a negative number, so the sum is always the bytes done."""


def sha256_file(path: str | Path, chunk_size: int = 8 * MiB) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def upload_file(
    local: str | Path,
    uri: str,
    *,
    config: TransferConfig | None = None,
    callback: ProgressCallback | None = None,
) -> str:
    """Copies a local file to an S3 object or a local path, atomically, with its sha256 recorded; returns the sha256.

    On S3 the file goes up through boto3's transfer layer: a file larger than `config.multipart_threshold` as a
    multipart upload of parallel parts, each request retried by botocore; S3 shows the object under its key only when
    the upload completes, so a reader never sees a partial object, and a failed upload is aborted. Every request
    carries the SHA256 of its bytes (`x-amz-checksum-sha256`), which the server checks on receipt and keeps (for a
    multipart object, the SHA256 of the parts' SHA256s); the sha256 of the whole file is also stored as object
    metadata (`x-amz-meta-sha256`) for servers that keep no checksums. Size and checksums are checked with a HEAD
    once the object is complete. The file must not change while it is uploaded (write checkpoints first).

    Args:
        local: The file to upload.
        uri: `s3://bucket/key` (the key validated, see `validate_key`) or a local path.
        config: Part size, concurrency and retry budget.
        callback: Progress, in bytes.

    Raises:
        StorageNotFoundError: `local` does not exist or the bucket does not.
        InvalidURIError: The URI is unsafe or names a prefix.
        StorageError: The transfer failed after its retries; the key still holds what it held before (nothing, or
            the previous object), never a part of this file.
    """
    config = config or TransferConfig()
    source = Path(local)
    if is_tar_member(uri):
        raise StorageError(uri, "tar members are read-only")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise InvalidURIError(uri, "an upload needs an object key, not a bucket or prefix")
    if not source.is_file():
        raise StorageNotFoundError(str(local), "no such file to upload")
    sha256 = sha256_file(source)
    if not is_s3(uri):
        _copy_local(source, Path(uri), callback)
        return sha256
    size = source.stat().st_size
    extra = {"Metadata": {SHA256_METADATA: sha256}, "ChecksumAlgorithm": "SHA256"}
    try:
        with _s3_errors(uri), config.manager() as manager:
            manager.upload(str(source), bucket, key, extra_args=extra, subscribers=[_subscriber(callback)]).result()
    except StorageError:
        # A completion whose response was lost fails the transfer with the object complete: then the key holds
        # exactly this file (whoever wrote it), and the upload did its job.
        with suppress(StorageError):
            if _holds(_head(uri, config), size, sha256):
                return sha256
        raise
    head = _head(uri, config)
    if not _holds(head, size, sha256):
        raise StorageError(uri, f"uploaded object does not match {source} (size {head['ContentLength']} of {size})")
    return sha256


def _head(uri: str, config: TransferConfig) -> dict[str, Any]:
    """HeadObject with S3's checksums (`ChecksumSHA256`, `ChecksumType`) when the server keeps them."""
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        return s3_client(max_attempts=config.max_attempts).head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")


def _holds(head: dict[str, Any], size: int, sha256: str) -> bool:
    """True when an object's HEAD says it holds `size` bytes with this sha256: recorded at upload, and S3's own when
    the server keeps a whole-object SHA256 (a multipart object's is checked on download, against its parts)."""
    native = head.get("ChecksumSHA256")
    return (
        int(head["ContentLength"]) == size
        and head.get("Metadata", {}).get(SHA256_METADATA) == sha256
        and (native is None or "-" in native or native == _b64(sha256))
    )


def download_file(
    uri: str,
    local: str | Path,
    *,
    config: TransferConfig | None = None,
    callback: ProgressCallback | None = None,
    require_checksum: bool = False,
) -> str:
    """Copies an S3 object (or a local file) to a local path, verified, atomically; returns the sha256.

    Large objects come down through boto3's transfer layer as parallel ranged GETs pinned to the ETag of the HEAD
    that read the object's checksums (an object replaced mid-download is an error, not a mix of two versions). The
    bytes go to a hidden temporary file beside the target and are checked before they are renamed over it: against
    the server's own SHA256 when it keeps one (the whole object's, or the SHA256 of the parts' SHA256s of a
    multipart object, with the part sizes the server reports), else against the sha256 recorded at upload.

    Args:
        uri: `s3://bucket/key` or a local path.
        local: The file to write (its folder is created).
        config: Part size, concurrency and retry budget.
        callback: Progress, in bytes.
        require_checksum: Refuse objects with neither an S3 SHA256 nor a recorded sha256 (not written by
            `upload_file`); otherwise those are checked for size only.

    Raises:
        StorageNotFoundError: No such object or file.
        StorageError: A checksum or size mismatch (nothing is written), or the transfer failed after its retries.
    """
    config = config or TransferConfig()
    target = Path(local)
    if not is_s3(uri):
        source = Path(uri)
        if not source.is_file():
            raise StorageNotFoundError(uri, "no such file")
        _copy_local(source, target, callback)
        return sha256_file(target)
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise InvalidURIError(uri, "a download needs an object key, not a bucket or prefix")
    head = _head(uri, config)
    expected = head.get("Metadata", {}).get(SHA256_METADATA)
    native = head.get("ChecksumSHA256")
    if expected is None and native is None and require_checksum:
        raise StorageError(uri, f"no S3 SHA256 and no sha256 recorded in the object's metadata ({SHA256_METADATA})")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with _s3_errors(uri), config.manager() as manager:
            manager.download(bucket, key, tmp, subscribers=[_subscriber(callback, known=head)]).result()
        actual = _verify_download(uri, Path(tmp), head, config)
        os.replace(tmp, target)
        return actual
    finally:
        Path(tmp).unlink(missing_ok=True)


def _verify_download(uri: str, path: Path, head: dict[str, Any], config: TransferConfig) -> str:
    """The downloaded file's sha256, after checking it against every digest the HEAD gave (nothing else is trusted)."""
    size, expected = path.stat().st_size, head.get("Metadata", {}).get(SHA256_METADATA)
    if size != head["ContentLength"]:
        raise StorageError(uri, f"short download: {size} of {head['ContentLength']} bytes; nothing was written")
    native = head.get("ChecksumSHA256")
    parts = None
    if native is not None and "-" in native:  # a multipart object's SHA256 of its parts' SHA256s
        parts = _part_sizes(uri, config)
        if parts is None:  # the server does not list parts: the recorded sha256 alone is checked
            native = None
    actual, composite = _file_digests(path, parts)
    checks = [(expected, actual, "sha256 recorded at upload")]
    if native is not None:
        checks.append((native, composite if parts is not None else _b64(actual), "S3 ChecksumSHA256"))
    for want, got, what in checks:
        if want is not None and want != got:
            raise StorageError(uri, f"checksum mismatch: {what} is {want}, the bytes give {got}; nothing was written")
    return actual


def _file_digests(path: Path, parts: list[int] | None) -> tuple[str, str | None]:
    """(hex sha256 of the file, S3's composite SHA256 `<b64 of SHA256 of the parts' SHA256s>-<n>` for `parts` sizes).

    The whole file's digest and the parts' digests are computed side by side in threads (hashlib releases the GIL on
    large buffers), so checking a multipart download costs one pass of the file's time, not two."""
    if parts is None:
        return sha256_file(path), None
    offsets = [0, *accumulate(parts[:-1])]
    with ThreadPoolExecutor(max_workers=max(2, min(len(parts) + 1, os.cpu_count() or 2))) as pool:
        whole = pool.submit(sha256_file, path)
        part_digests = list(pool.map(partial(_range_digest, path), offsets, parts))
        composite = hashlib.sha256(b"".join(part_digests)).digest()
        return whole.result(), f"{base64.b64encode(composite).decode()}-{len(parts)}"


def _range_digest(path: Path, offset: int, size: int, chunk_size: int = 8 * MiB) -> bytes:
    """SHA256 of `size` bytes of a file from `offset`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while size > 0 and (chunk := f.read(min(chunk_size, size))):
            digest.update(chunk)
            size -= len(chunk)
    return digest.digest()


def _part_sizes(uri: str, config: TransferConfig) -> list[int] | None:
    """The sizes of a multipart object's parts, in order (GetObjectAttributes); None when the server cannot say."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    client, sizes, marker = s3_client(max_attempts=config.max_attempts), [], 0
    try:
        while True:
            with _s3_errors(uri):
                reply = client.get_object_attributes(
                    Bucket=bucket, Key=key, ObjectAttributes=["ObjectParts"], PartNumberMarker=marker
                )
            listing = reply.get("ObjectParts") or {}
            sizes += [p["Size"] for p in listing.get("Parts", [])]
            if not listing.get("IsTruncated"):
                return sizes or None
            marker = listing["NextPartNumberMarker"]
    except StorageError as err:
        if isinstance(err, StorageNotFoundError) or not isinstance(err.__cause__, ClientError):
            raise
        log.info("%s: the server lists no parts (%s); checking the recorded sha256 only", uri, err.__cause__)
        return None


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _subscriber(callback: ProgressCallback | None = None, *, known: dict[str, Any] | None = None) -> Any:
    """An s3transfer subscriber: reports progress to `callback`; with `known` (the size and ETag of our HEAD), hands
    them to s3transfer, so it sends no HEAD of its own and pins every GET to that ETag."""
    from s3transfer.subscribers import BaseSubscriber

    class Subscriber(BaseSubscriber):
        def on_queued(self, future: Any, **kwargs: Any) -> None:
            if known is not None:
                future.meta.provide_transfer_size(int(known["ContentLength"]))
                future.meta.provide_object_etag(known["ETag"])

        def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
            if callback is not None:
                callback(bytes_transferred)

    return Subscriber()


def upload_tree(local_dir: str | Path, uri: str, *, config: TransferConfig | None = None) -> dict[str, str]:
    """Uploads every file under a folder (a checkpoint, an export) with `upload_file`; returns {relative path: sha256}.

    Files go up one after the other (each in parallel parts), `model.json`-style descriptors last, so a reader that
    waits for the descriptor finds the weights already complete.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageNotFoundError(str(local_dir), "no such folder to upload")
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: (p.suffix == ".json", str(p)))
    out: dict[str, str] = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        out[rel] = upload_file(path, join(uri, rel), config=config)
    return out


def download_tree(uri: str, local_dir: str | Path, *, config: TransferConfig | None = None) -> dict[str, str]:
    """Downloads every object under a prefix (or every file under a folder) into `local_dir`, each verified.

    Keys map to paths below `local_dir` only: a key with `..`, `.` or empty segments is refused (`validate_key`), so
    a hostile listing cannot write outside the folder.
    """
    base = normalize(uri)
    out: dict[str, str] = {}
    for item in list_files(uri):
        rel = item[len(base) :].lstrip("/") if is_s3(item) else os.path.relpath(item, base)
        validate_key(rel, item)
        out[rel] = download_file(item, Path(local_dir) / rel, config=config)
    return out


@contextmanager
def local_copy(uri: str, *, config: TransferConfig | None = None) -> Iterator[Path]:
    """A local path to read `uri` from: the file itself, or a verified download of the S3 object (streamed to disk,
    never held in memory) into a temporary folder that is removed when the block ends."""
    if not is_s3(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="dinov2-s3-") as tmp:
        path = Path(tmp) / basename(uri)
        download_file(uri, path, config=config)
        yield path


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A path to write `target` through: a hidden temporary file in the same folder, with the same suffix (writers that
    pick a format by suffix keep working), renamed over `target` when the block ends and removed if it raises. Readers
    (and DVC, and a resumed run) never see a half-written file; concurrent writers each get their own name."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def _atomic_file(target: Path) -> Iterator[Any]:
    """A binary file object for `target` through `atomic_path`, flushed to disk before the rename."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def _copy_local(source: Path, target: Path, callback: ProgressCallback | None) -> None:
    """Copies through a hidden temporary file renamed over the target, as `write_bytes` does."""
    with _atomic_file(target) as dst, open(source, "rb") as src:
        shutil.copyfileobj(src, dst, 8 * MiB)
    if callback:
        callback(target.stat().st_size)


# --------------------------------------------------------------------------------------------------------------------
# Failed local writes, named
# --------------------------------------------------------------------------------------------------------------------

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
WRITE_ERRNOS = NO_SPACE_ERRNOS | {errno.EFBIG, errno.EROFS, errno.EIO}
"""OS errors that say a write failed for the disk's sake (not a missing input or a bad path)."""


def free_bytes(path: str | Path) -> int | None:
    """Bytes free for this user on the filesystem holding `path` (or its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def format_bytes(num: int | None) -> str:
    """`1.5 GiB (1610612736 bytes)`; `unknown` for None."""
    if num is None:
        return "unknown"
    size, unit = float(num), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{num} bytes" if unit == "bytes" else f"{size:.1f} {unit} ({num} bytes)"


def write_error(
    path: str | Path, err: OSError, *, what: str, needed: int | None = None, kept: str = ""
) -> StorageError:
    """The error for a failed local write: an `OutOfSpaceError` for no space or quota, else a `StorageError`, each
    naming `what` was written where, the bytes needed and free, the OS error, and `kept` (what was left as it was)."""
    free = free_bytes(path)
    sizes = f"{format_bytes(free)} free"
    if needed:
        sizes = f"it needs about {format_bytes(needed)}, {sizes}"
    reason = os.strerror(err.errno) if err.errno else str(err)
    message = f"{what} could not be written: {reason} ({sizes})"
    if kept:
        message += f"; {kept}"
    cls = OutOfSpaceError if err.errno in NO_SPACE_ERRNOS else StorageError
    return cls(str(path), message)


_OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)")


def os_error_of(err: BaseException) -> OSError | None:
    """The OS error behind a failed write: the error itself, or the one a library names in its message (safetensors
    says "... (os error 28)"); None for any other error."""
    if isinstance(err, OSError):
        return err
    m = _OS_ERROR_IN_MESSAGE.search(str(err))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


@contextmanager
def named_write_errors(path: str | Path, *, what: str, needed: int | None = None, kept: str = "") -> Iterator[None]:
    """Turns an OS error of a write in the block (no space, quota, file too large, read-only filesystem, I/O error)
    into `write_error`'s; other errors (a missing input, ...) pass as they are."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        os_error = os_error_of(err)
        if os_error is None or os_error.errno not in WRITE_ERRNOS:
            raise
        raise write_error(path, os_error, what=what, needed=needed, kept=kept) from err


class HashingWriter:
    """A binary file that hashes and counts what goes through it and keeps the OS error of a failed write (torch's
    zip writer replaces it by a RuntimeError that says "unexpected pos")."""

    def __init__(self, f: Any) -> None:
        self.f, self.hash, self.bytes = f, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            written = self.f.write(data)
        except OSError as err:
            self.error = err
            raise
        self.hash.update(data)
        self.bytes += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj: Any, path: str | Path) -> tuple[int, str]:
    """`torch.save(obj)` to a local file, flushed to disk; an OS error of the write (no space) is raised as itself.

    Returns:
        (bytes written, their sha256), computed as they are written.
    """
    import torch

    with open(path, "wb") as f:
        writer = HashingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as err:
            if writer.error is not None:
                raise writer.error from err
            raise
        f.flush()
        os.fsync(f.fileno())
    return writer.bytes, writer.hash.hexdigest()


def tree_bytes(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def replace_folder(staging: str | Path, target: str | Path) -> None:
    """Puts a completely written folder in place of `target` (or where none was): `target` is renamed aside, the
    staging folder renamed into place, then the old one removed; renames need no space, so a disk that filled up
    while `staging` was written has left `target` as it was."""
    staging, target = Path(staging), Path(target)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
