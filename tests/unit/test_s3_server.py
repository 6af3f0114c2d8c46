"""The local S3 server the object-store tests rely on speaks S3 to every client we use."""

from __future__ import annotations

import pyarrow as pa


def test_s3_server_serves_boto3_s3fs_and_delta(s3) -> None:
    import s3fs
    from deltalake import DeltaTable, write_deltalake

    url = s3.create_bucket("smoke")
    fs = s3fs.S3FileSystem()  # endpoint and keys from the AWS_* variables the fixture set
    fs.pipe(f"{url}/hello.txt", b"hi")
    assert s3.client().get_object(Bucket="smoke", Key="hello.txt")["Body"].read() == b"hi"

    write_deltalake(f"{url}/t", pa.table({"x": [1, 2]}))
    assert DeltaTable(f"{url}/t").to_pyarrow_table().column("x").to_pylist() == [1, 2]
