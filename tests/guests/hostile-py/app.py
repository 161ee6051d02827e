"""A hostile Python processor for the tests: each path misbehaves one way, and only that
request may fail (`runtime/cli/tests/languages.rs`)."""

import wasp
from wasp.exports import *  # noqa: F401,F403


@wasp.handle
def handle(request):
    path = request.path.split("?")[0]
    if path == "/ok":
        return wasp.Response.text("ok")
    if path == "/raise":
        raise ValueError("raised on purpose")
    if path == "/loop":
        n = 0
        while True:
            n += 1
    if path == "/oom":
        hoard = []
        while True:
            hoard.append(bytearray(1 << 20))
    raise wasp.ProcessorError.not_found(f"no path {path}")
