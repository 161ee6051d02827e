"""Schemathesis hooks for scripts/fuzz-api: serializers for the two bodies wasp takes that
are not JSON (a TOML spec and a wasm component), sent as the bytes that were generated."""

import schemathesis


@schemathesis.serializer("application/toml", "application/wasm")
def raw(ctx, value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()
