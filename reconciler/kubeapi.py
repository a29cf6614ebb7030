"""The Kubernetes API, through the official `kubernetes` client, without blocking the event loop.

The client brings configuration (in-cluster service account, kubeconfig files and
contexts, exec plugins, token refresh, TLS) and its REST layer; it is synchronous, so
every call runs on a small pool of worker threads of its own, and each watch stream is
read by a thread of its own that hands events to the loop (watches last minutes: on a
shared pool they would starve every other call). Objects stay plain JSON dicts: the parsers in `api/` and
`reconciler/kube.py` read those, and typed client models would cost more than they give.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client library is imported in Kubernetes mode only (90 ms of every start)
    from kubernetes.client import ApiClient

log = logging.getLogger("overspill.kubernetes")


class ApiError(Exception):
    """A non-2xx answer (or no answer) from the API server."""

    def __init__(self, status: int, reason: str, message: str = ""):
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")


class Gone(ApiError):
    """410: the resourceVersion a watch started from is too old; list again."""


def load_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """In-cluster config when running in a pod (and no kubeconfig is named), else the kubeconfig."""
    import kubernetes
    from kubernetes.client import ApiClient, Configuration

    configuration = Configuration()
    configuration.connection_pool_maxsize = 32  # 8 request threads and a watch per kind, with room
    if kubeconfig is None and context is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return ApiClient(configuration)
        except kubernetes.config.ConfigException:
            pass
    kubernetes.config.load_kube_config(
        config_file=kubeconfig, context=context, client_configuration=configuration, persist_config=False
    )
    return ApiClient(configuration)


@dataclass
class Backoff:
    """Exponential backoff with full jitter, so replicas that lost the server do not return in step."""

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0

    def next(self) -> float:
        self.attempt += 1
        return random.uniform(0, min(self.cap, self.base * 2**self.attempt))

    def reset(self) -> None:
        self.attempt = 0


class KubeApi:
    """JSON in, JSON out, over the client's REST layer."""

    def __init__(self, client: ApiClient, request_timeout: float = 30.0, workers: int = 8):
        self.client = client
        self.request_timeout = request_timeout
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kube-api")

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _request(
        self, method: str, path: str, params: dict | None, body: Any, content_type: str | None, timeout: Any
    ):
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        query = [(k, v) for k, v in (params or {}).items() if v is not None]
        method_, url, headers_, body_, post_ = self.client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        from kubernetes.client import ApiException

        try:
            return self.client.call_api(method_, url, headers_, body_, post_, _request_timeout=timeout)
        except ApiException as exc:  # raised by the REST layer for transport errors
            raise ApiError(exc.status or 0, exc.reason or "error", str(exc.body or "")) from None
        except Exception as exc:  # urllib3 connection errors and the like
            raise ApiError(0, type(exc).__name__, str(exc)) from None

    def _call(self, method: str, path: str, params: dict | None, body: Any, content_type: str | None) -> dict:
        response = self._request(method, path, params, body, content_type, self.request_timeout)
        response.read()
        data = response.data or b""
        if not 200 <= response.status <= 299:
            raise _error(response.status, data)
        return json.loads(data) if data else {}

    async def get(self, path: str, params: dict | None = None) -> dict:
        return await self._in_thread(self._call, "GET", path, params, None, None)

    async def create(self, path: str, body: dict) -> dict:
        return await self._in_thread(self._call, "POST", path, None, body, "application/json")

    async def replace(self, path: str, body: dict) -> dict:
        return await self._in_thread(self._call, "PUT", path, None, body, "application/json")

    async def merge_patch(self, path: str, body: dict) -> dict:
        return await self._in_thread(self._call, "PATCH", path, None, body, "application/merge-patch+json")

    async def list(self, path: str, params: dict | None = None) -> tuple[list[dict], str]:
        """Every item (following `continue`) and the list's resourceVersion."""
        items: list[dict] = []
        query = dict(params or {}, limit=500)
        while True:
            page = await self.get(path, query)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion") or "")
            query["continue"] = meta["continue"]

    async def watch(
        self, path: str, resource_version: str, params: dict | None = None, timeout_seconds: int = 300
    ) -> AsyncIterator[dict]:
        """Watch events (`{"type", "object"}`) from `resource_version`, bookmarks included.

        Ends cleanly when the server closes the stream; raises `Gone` on 410 and `ApiError`
        on other errors. The stream is read in a worker thread; closing the iterator shuts
        its socket so the thread ends at once.
        """
        query = dict(
            params or {},
            watch="true",
            resourceVersion=resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(timeout_seconds),
        )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        response = await self._in_thread(
            self._request, "GET", path, query, None, None, (self.request_timeout, timeout_seconds + 30)
        )
        if not 200 <= response.status <= 299:
            response.read()
            raise _error(response.status, response.data or b"")

        done = asyncio.Event()

        def hand(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        from kubernetes.watch.watch import iter_resp_lines

        def pump() -> None:
            try:
                for line in iter_resp_lines(response.response):
                    if line.strip():
                        hand(line)
            except Exception as exc:  # the socket shut by `close` below, or the server going away
                hand(exc)
            finally:
                hand(None)
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=pump, name=f"watch {path}", daemon=True).start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise ApiError(0, type(item).__name__, str(item))
                event = json.loads(item)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    code = int(status.get("code") or 0)
                    cls = Gone if code == 410 else ApiError
                    raise cls(code, str(status.get("reason") or "Error"), str(status.get("message") or ""))
                yield event
        finally:
            _shut(response.response)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 5)


def _shut(raw) -> None:
    """Unblock a reader thread stuck in recv: shut the socket, then release the connection."""
    try:
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        raw.release_conn()
    except Exception:  # already closed
        pass


def _error(status: int, data: bytes) -> ApiError:
    try:
        body = json.loads(data)
    except ValueError:
        body = {}
    reason = str(body.get("reason") or "Error") if isinstance(body, dict) else "Error"
    if isinstance(body, dict):
        message = str(body.get("message") or "")
    else:
        message = data[:200].decode(errors="replace")
    return (Gone if status == 410 else ApiError)(status, reason, message)
