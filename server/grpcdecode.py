"""A request the control API cannot decode is refused as a request with a bad field is:
``INVALID_ARGUMENT`` with protobuf's reason. grpcio's own deserializer let the ``DecodeError``
out of the call (``UNKNOWN: Unexpected <class '...DecodeError'>``, and a warning line in the
node agent's log for each such request).

A server interceptor wraps each method's deserializer: what does not decode becomes an
:class:`Undecodable` in the request's place, and the method's behaviour, wrapped too, refuses
it before it reaches the servicer (for a stream of requests, when the stream gets there)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class Undecodable:
    """What stands for a request that did not decode."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RefuseUndecodable(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every method of the server: an undecodable request ends the call ``INVALID_ARGUMENT``."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        kind = ("stream" if handler.request_streaming else "unary") + "_"
        kind += "stream" if handler.response_streaming else "unary"
        behaviour = getattr(handler, kind)
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler  # (a synchronous one, as grpc.aio allows: none of zds's)
        wrap = _streamed if handler.request_streaming else _single
        # (RpcMethodHandler is a NamedTuple in grpcio)
        return handler._replace(
            request_deserializer=_deserializer(handler.request_deserializer), **{kind: wrap(behaviour)}
        )


def _deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:  # (a string field that is not UTF-8 too)
            return Undecodable(str(exc))

    return run


async def _refuse(context: grpc.aio.ServicerContext, request: Undecodable) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a message of this method: {request.reason}"
    )


def _single(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """A method of one request: refused before ``behaviour`` runs."""
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for reply in behaviour(request, context):
                yield reply

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        return await behaviour(request, context)

    return call


def _streamed(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """A method of a stream of requests: refused when the stream reaches the undecodable one,
    once the behaviour has ended on it (the answers to the requests before it go out first)."""

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                raise _Refused(request)
            yield request

    if inspect.isasyncgenfunction(behaviour):

        async def stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for reply in behaviour(checked(requests), context):
                    yield reply
            except _Refused as refused:
                await _refuse(context, refused.request)

        return stream

    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(checked(requests), context)
        except _Refused as refused:
            await _refuse(context, refused.request)

    return call


class _Refused(Exception):
    """An undecodable request met in a stream: the method's behaviour ends on it as on an error
    of its own (answering what came before), then the call is refused."""

    def __init__(self, request: Undecodable) -> None:
        super().__init__(request.reason)
        self.request = request
