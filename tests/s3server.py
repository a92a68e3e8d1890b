"""moto's S3 server on a loopback port for the object-store tests, reached by s3fs through
botocore's standard ``AWS_ENDPOINT_URL`` with made-up credentials from the standard
environment variables (restored afterwards).

    with s3_bucket("bucket", "AKIA...", "secret") as server:
        server.fs.ls("bucket"); server.requests   # (method, path, Range) of each request
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN",
        "AWS_PROFILE")


class CountingS3:
    """moto's S3 on a loopback port; ``requests`` holds (method, path, Range header) of each."""

    def __init__(self):
        from moto.moto_server import werkzeug_app as moto_app
        from werkzeug.serving import make_server

        app = moto_app.DomainDispatcherApplication(moto_app.create_backend_app)
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.fs = None

        def counted(environ, start_response):
            with self.lock:
                self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("HTTP_RANGE")))
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counted, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()


@contextlib.contextmanager
def s3_bucket(bucket: str, key_id: str, secret: str) -> Iterator[CountingS3]:
    """A CountingS3 with ``bucket`` made, the AWS environment pointing at it (``.fs``: an
    s3fs client); the environment and s3fs's instance cache restored on exit."""
    saved = {k: os.environ.get(k) for k in _ENV}
    server = CountingS3()
    os.environ.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_ENDPOINT_URL=server.endpoint,
                      AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        server.fs = s3fs.S3FileSystem()
        server.fs.mkdir(bucket)
        yield server
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
