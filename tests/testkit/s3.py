"""A real S3 HTTP endpoint on 127.0.0.1 (moto's server mode, in a thread of the test process) for the
object-storage tests. pyarrow's S3 filesystem, the CLI commands the tests start and the Ray workers of a
cluster started afterwards all reach it through the standard AWS_* variables (`env`)."""

from __future__ import annotations

import pyarrow.fs as pafs

from testkit.net import free_port


class S3Endpoint:
    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        self.fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                                    endpoint_override=f"127.0.0.1:{self.port}", allow_bucket_creation=True,
                                    allow_bucket_deletion=True)
        self.buckets = 0

    def bucket(self, prefix: str = "b") -> str:
        """A new empty bucket; returns its s3:// URI."""
        self.buckets += 1
        name = f"{prefix}-{self.buckets}"
        self.fs.create_dir(name)
        return f"s3://{name}"

    def keys(self, uri: str) -> list[str]:
        """Every object under `uri` (bucket-relative keys)."""
        root = uri.removeprefix("s3://").rstrip("/")
        infos = self.fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        self.server.stop()
