"""A real S3 API on loopback for the tests: moto's server, answering one request at a time.

Why one at a time: moto checks ``If-Match``/``If-None-Match`` and then writes, with no lock between
(moto 5.2, ``moto/s3/responses.py::put_object``), so two concurrent conditional PUTs could both pass.
S3 itself makes each conditional write atomic; serialising moto's requests gives the tests that
behaviour, so a lease test that passes here does not pass by luck of the thread scheduler.
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.request
import uuid
from collections.abc import Iterator

from moto.server import ThreadedMotoServer

# The standard AWS environment, pointed at the local server; nothing can reach a real account.
ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


class SerialMotoServer(ThreadedMotoServer):
    """moto's threaded server on 127.0.0.1, its WSGI application behind one lock."""

    def _server_entry(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()

        def serial(environ, start_response):
            with lock:
                return list(app(environ, start_response))

        self._server = make_server(self._ip_address, self._port, serial, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


@contextlib.contextmanager
def s3_environment() -> Iterator[str]:
    """Start the server on a free loopback port and point the AWS environment at it; yield the endpoint."""
    import pytest

    server = SerialMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name in UNSET:
            patch.delenv(name, raising=False)
        for name, value in {**ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint}.items():
            patch.setenv(name, value)
        try:
            yield endpoint
        finally:
            server.stop()


def new_bucket(prefix: str = "pf") -> str:
    """A fresh, empty bucket on the test server: its name."""
    from posterfusion.locations import Location

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client = s3_client()
    client.create_bucket(Bucket=name)
    assert Location(f"s3://{name}").bucket == name
    return name


def s3_client():
    import boto3

    return boto3.session.Session().client("s3")


@contextlib.contextmanager
def credentials_checked(endpoint: str) -> Iterator[None]:
    """While inside, the server checks access keys, so the tests' dummy ones are wrong (moto's reset-auth API)."""
    previous = _reset_auth(endpoint, "0")
    try:
        yield
    finally:
        _reset_auth(endpoint, previous)


def _reset_auth(endpoint: str, count: str) -> str:
    import json

    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})  # a form body would reach moto empty
    with urllib.request.urlopen(request, timeout=10) as answer:  # loopback only: the endpoint is 127.0.0.1
        return str(json.loads(answer.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])
