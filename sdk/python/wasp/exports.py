"""The component's entry points, for componentize-py to find in the app module.

``from wasp.exports import *`` in the module you build re-exports ``Lifecycle`` and, for
the interfaces the chosen world exports, ``Handler`` and ``Transform``. Each dispatches to
the function registered with the matching :mod:`wasp` decorator.
"""

from __future__ import annotations

from wit_world import exports as _exports

import wasp as _wasp

__all__ = ["Lifecycle"]


class Lifecycle(_exports.Lifecycle):
    """``wasp:processor/lifecycle``: runs the ``@wasp.init`` function, if any."""

    def init(self) -> None:
        if "init" in _wasp._calls:
            _wasp._call("init", "")


if hasattr(_exports, "Handler"):

    class Handler(_exports.Handler):
        """``wasp:processor/handler``: runs the ``@wasp.handle`` function."""

        def handle(self, request):
            return _wasp._call(
                "handle",
                "this processor does not serve requests alone (handle)",
                _wasp._request(request),
            )

    __all__.append("Handler")


if hasattr(_exports, "Transform"):

    class Transform(_exports.Transform):
        """``wasp:processor/transform``: runs ``@wasp.pre_process`` and ``@wasp.post_process``."""

        def pre_process(self, request):
            return _wasp._call(
                "pre_process",
                "this processor does not pre-process (pre_process)",
                _wasp._request(request),
            )

        def post_process(self, context, output):
            return _wasp._call(
                "post_process",
                "this processor does not post-process (post_process)",
                bytes(context),
                output,
            )

    __all__.append("Transform")
