"""Schemathesis hooks for scripts/fuzz-api: serializers for the bodies wasp takes that are
not JSON (a TOML spec, a wasm component, a JSONL batch input), sent as the bytes that were
generated."""

import schemathesis


@schemathesis.serializer("application/toml", "application/wasm", "application/jsonl")
def raw(ctx, value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()
