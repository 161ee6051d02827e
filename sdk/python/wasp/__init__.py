"""Write wasp processors in Python.

A processor is a Wasm component behind the ``wasp:processor`` WIT contract (``wit/``).
componentize-py generates the bindings from those files at build time (the
``wit_world`` package); this module wraps them the way the Rust SDK does. Register the
calls you implement with the decorators, and re-export the component's entry points::

    import wasp
    from wasp.exports import *  # noqa: F401,F403  (Lifecycle, Handler, Transform)

    @wasp.handle
    def hello(request: wasp.Request) -> wasp.Response:
        name = request.json().get("name")
        if not isinstance(name, str):
            raise wasp.ProcessorError.bad_request("`name` must be a string", field="name")
        return wasp.Response.json({"greeting": f"hello, {name}"})

Build it with ``wasp processor build`` (or ``componentize-py -d wit -w full componentize
app -p . -p <sdk>``). Calls you leave unregistered answer ``unsupported`` (HTTP 501).
An exception other than :class:`ProcessorError` answers ``internal`` (HTTP 500) with
its type and message, and is logged with its traceback; the instance keeps serving.
"""

from __future__ import annotations

import json as _json
import struct as _struct
import traceback as _traceback
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

from componentize_py_types import Err
from wit_world.imports import config as _config
from wit_world.imports import inference as _inference
from wit_world.imports import log as _log
from wit_world.imports import types as _types

__all__ = [
    "Dtype",
    "ModelInput",
    "ModelOutput",
    "Prepared",
    "ProcessorError",
    "Request",
    "Response",
    "Tensor",
    "config",
    "handle",
    "infer",
    "init",
    "log",
    "post_process",
    "pre_process",
]

Dtype = _types.Dtype
"""Element type of a tensor (``Dtype.F32``, ``Dtype.I64``, ...)."""
ModelInput = _types.ModelInput
"""What a model receives: ``tensors`` and ``parameters`` (a JSON object as text, or None)."""
ModelOutput = _types.ModelOutput
"""One model output chunk: ``tensors``, ``metadata`` (JSON text or None), ``index``, ``last``."""
Prepared = _types.Prepared
"""The result of pre-processing: ``input`` (a ModelInput) and ``context`` (bytes)."""


class ProcessorError(Exception):
    """An error answered to the client: ``code`` decides the HTTP status.

    Codes (and statuses): ``bad-request`` (400), ``forbidden`` (403), ``not-found`` (404),
    ``too-large`` (413), ``unprocessable`` (422), ``unsupported`` (501), ``unavailable``
    (503), ``internal`` (500). ``field`` names the request field at fault, if any.
    """

    _CODES = {
        "bad-request": _types.ErrorCode.BAD_REQUEST,
        "forbidden": _types.ErrorCode.FORBIDDEN,
        "not-found": _types.ErrorCode.NOT_FOUND,
        "too-large": _types.ErrorCode.TOO_LARGE,
        "unprocessable": _types.ErrorCode.UNPROCESSABLE,
        "unsupported": _types.ErrorCode.UNSUPPORTED,
        "unavailable": _types.ErrorCode.UNAVAILABLE,
        "internal": _types.ErrorCode.INTERNAL,
    }

    def __init__(self, code: str, message: str, field: Optional[str] = None):
        if code not in self._CODES:
            raise ValueError(f"unknown error code {code!r} (one of {', '.join(self._CODES)})")
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def bad_request(cls, message: str, field: Optional[str] = None) -> "ProcessorError":
        """A malformed request (400)."""
        return cls("bad-request", message, field)

    @classmethod
    def unprocessable(cls, message: str, field: Optional[str] = None) -> "ProcessorError":
        """A well-formed request that cannot be processed (422)."""
        return cls("unprocessable", message, field)

    @classmethod
    def too_large(cls, message: str, field: Optional[str] = None) -> "ProcessorError":
        """A request that is too large (413)."""
        return cls("too-large", message, field)

    @classmethod
    def not_found(cls, message: str, field: Optional[str] = None) -> "ProcessorError":
        """Something named in the request does not exist (404)."""
        return cls("not-found", message, field)

    @classmethod
    def unsupported(cls, message: str) -> "ProcessorError":
        """A call this processor does not implement (501)."""
        return cls("unsupported", message)

    @classmethod
    def unavailable(cls, message: str) -> "ProcessorError":
        """A dependency is unavailable for now (503)."""
        return cls("unavailable", message)

    @classmethod
    def internal(cls, message: str) -> "ProcessorError":
        """A failure inside the processor (500)."""
        return cls("internal", message)

    def to_wit(self) -> _types.Error:
        """The error as the contract's ``error`` record."""
        return _types.Error(code=self._CODES[self.code], message=self.message, field=self.field)

    @classmethod
    def from_wit(cls, error: _types.Error) -> "ProcessorError":
        """A host error (from :func:`infer`) as a ProcessorError."""
        code = next(k for k, v in cls._CODES.items() if v == error.code)
        return cls(code, error.message, error.field)


class Request:
    """A request as it reached the gateway: ``method``, ``path`` (below the endpoint's
    invoke route, with the query), ``headers`` (lower-case names, in order), ``body``."""

    __slots__ = ("method", "path", "headers", "body")

    def __init__(self, method: str, path: str, headers: List[Tuple[str, str]], body: bytes):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        """The body parsed as JSON; a ``bad-request`` error naming the problem otherwise."""
        try:
            return _json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProcessorError.bad_request(
                f"request body is not valid JSON for this endpoint: {e}"
            ) from None

    def text(self) -> str:
        """The body as UTF-8 text; a ``bad-request`` error otherwise."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProcessorError.bad_request(f"request body is not UTF-8: {e}") from None

    def header(self, name: str) -> Optional[str]:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Response:
    """Builds the contract's ``response`` record."""

    @staticmethod
    def json(value: Any, status: int = 200, headers: Sequence[Tuple[str, str]] = ()) -> _types.Response:
        """``value`` serialised as compact JSON (UTF-8, non-ASCII kept as is)."""
        body = _json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return Response.bytes("application/json", body, status, headers)

    @staticmethod
    def text(text: str, status: int = 200, headers: Sequence[Tuple[str, str]] = ()) -> _types.Response:
        """A plain-text response."""
        return Response.bytes("text/plain; charset=utf-8", text.encode("utf-8"), status, headers)

    @staticmethod
    def bytes(
        content_type: str, body: bytes, status: int = 200, headers: Sequence[Tuple[str, str]] = ()
    ) -> _types.Response:
        """A response with the given content type and body."""
        return _types.Response(
            status=status, headers=[("content-type", content_type), *headers], body=bytes(body)
        )


_FORMATS = {
    _types.Dtype.F32: "f",
    _types.Dtype.F64: "d",
    _types.Dtype.I64: "q",
    _types.Dtype.I32: "i",
    _types.Dtype.U32: "I",
    _types.Dtype.U8: "B",
}


class Tensor:
    """Makes and reads the contract's ``tensor`` records (little-endian, row-major)."""

    @staticmethod
    def new(name: str, dtype: "_types.Dtype", shape: Sequence[int], values: Iterable[Any]) -> _types.Tensor:
        """A tensor of ``values`` (flattened) with the given element type and shape."""
        fmt = _FORMATS.get(dtype)
        if fmt is None:
            raise ProcessorError.internal(f"no Python conversion for {dtype.name}")
        values = list(values)
        expected = 1
        for d in shape:
            expected *= d
        if len(values) != expected:
            raise ProcessorError.internal(
                f"tensor `{name}`: {len(values)} values for shape {list(shape)}"
            )
        data = _struct.pack(f"<{len(values)}{fmt}", *values)
        return _types.Tensor(name=name, dtype=dtype, shape=list(shape), data=data)

    @staticmethod
    def f32(name: str, shape: Sequence[int], values: Iterable[float]) -> _types.Tensor:
        """A tensor of 32-bit floats."""
        return Tensor.new(name, _types.Dtype.F32, shape, values)

    @staticmethod
    def i64(name: str, shape: Sequence[int], values: Iterable[int]) -> _types.Tensor:
        """A tensor of 64-bit integers."""
        return Tensor.new(name, _types.Dtype.I64, shape, values)

    @staticmethod
    def values(tensor: _types.Tensor) -> List[Any]:
        """The elements as a flat list; an ``internal`` error if the bytes do not fit."""
        fmt = _FORMATS.get(tensor.dtype)
        if fmt is None:
            raise ProcessorError.internal(f"no Python conversion for {tensor.dtype.name}")
        count = 1
        for d in tensor.shape:
            count *= d
        size = _struct.calcsize(fmt)
        if len(tensor.data) != count * size:
            raise ProcessorError.internal(
                f"tensor `{tensor.name}` has {len(tensor.data)} bytes for shape {list(tensor.shape)}"
            )
        return list(_struct.unpack(f"<{count}{fmt}", tensor.data))


class log:
    """Writing to the endpoint's log (``wasp logs``)."""

    @staticmethod
    def debug(message: str) -> None:
        """Logs at ``debug``."""
        _log.log(_log.Level.DEBUG, message)

    @staticmethod
    def info(message: str) -> None:
        """Logs at ``info``."""
        _log.log(_log.Level.INFO, message)

    @staticmethod
    def warn(message: str) -> None:
        """Logs at ``warn``."""
        _log.log(_log.Level.WARN, message)

    @staticmethod
    def error(message: str) -> None:
        """Logs at ``error``."""
        _log.log(_log.Level.ERROR, message)


class config:
    """The version's configuration (the ``env`` of its spec)."""

    @staticmethod
    def get(key: str, default: Optional[str] = None) -> Optional[str]:
        """The value of ``key``, or ``default`` when the spec does not set it."""
        value = _config.get(key)
        return default if value is None else value

    @staticmethod
    def get_all() -> List[Tuple[str, str]]:
        """Every key and value the spec sets, sorted by key."""
        return _config.get_all()


def infer(model: str, input: _types.ModelInput) -> List[_types.ModelOutput]:
    """Runs ``input`` through the tenant's endpoint ``model`` (its backend only) and returns
    every output chunk; raises ProcessorError when the host refuses."""
    try:
        return _inference.infer(model, input)
    except Err as e:
        raise ProcessorError.from_wit(e.value) from None


_calls: dict = {}


def _register(name: str) -> Callable[[Callable], Callable]:
    def register(function: Callable) -> Callable:
        if name in _calls:
            raise ValueError(f"a `{name}` function is registered twice")
        _calls[name] = function
        return function

    return register


init = _register("init")
"""Decorates the function run once per instance before its first call (no arguments)."""
handle = _register("handle")
"""Decorates the function that answers a request alone (backend ``none``):
``(Request) -> response``."""
pre_process = _register("pre_process")
"""Decorates the function that turns a request into model input:
``(Request) -> Prepared``."""
post_process = _register("post_process")
"""Decorates the function that turns one model output chunk into a response chunk:
``(context: bytes, ModelOutput) -> response``."""


def _call(name: str, missing: str, *args: Any) -> Any:
    """Runs a registered call, turning what it raises into the contract's error value."""
    function = _calls.get(name)
    try:
        if function is None:
            raise ProcessorError.unsupported(missing)
        return function(*args)
    except ProcessorError as e:
        raise Err(e.to_wit()) from None
    except Err:
        raise
    except Exception as e:  # noqa: BLE001 - every other failure is the processor's bug
        log.error(f"{name} raised:\n{_traceback.format_exc()}")
        raise Err(
            _types.Error(
                code=_types.ErrorCode.INTERNAL,
                message=f"unhandled exception in {name}: {type(e).__name__}: {e}",
                field=None,
            )
        ) from None


def _request(request: _types.Request) -> Request:
    return Request(request.method, request.path, request.headers, request.body)
