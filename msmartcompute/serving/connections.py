"""What a front accepts from the network: the waitress settings that bound connections, read
deadlines on every request, and waitress' own error pages written as the seed's envelope.

- `connection_limit` open connections per front (default 1000; waitress' own default of 100
  let ~100 idle clients stall every answer, /health included), on poll() since select()
  stops at descriptor 1024; past it, new connections wait in the listen backlog.
- An idle keep-alive connection is closed after `idle_timeout_s`.
- A request whose head (request line + headers) has not arrived `header_timeout_s` after its
  first byte, or whose body has not arrived `body_timeout_s` after it, is dropped however
  steadily it trickles in (waitress alone only times out silence, so a slow-loris client
  sending a byte a second held its connection forever).
- waitress' own errors (400 for a bad request line, a bad header or a CR/LF inside one, 413
  for a body over the limit, 431 for headers over `max_header_bytes`, its 500) answer the
  error envelope with a fixed message: waitress' text can quote the offending header line,
  and that line can be the Authorization one.
"""
from __future__ import annotations

import resource
import time
from operator import itemgetter

import orjson
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask, WSGITask
from waitress.utilities import build_http_date

from ..api.envelope import error, once_a_second
from ..api.errors import code_for_status

_MESSAGES = {
    400: "Malformed HTTP request (request line, headers or chunked encoding)",
    413: "Request body is over the server's size limit",
    431: "Request header fields are too large",
    500: "Internal server error",
}


def connection_settings(config) -> dict:
    """waitress adjustments for the limits in `config` (a ServerConfig)."""
    return {"connection_limit": config.connection_limit, "channel_timeout": config.idle_timeout_s,
            # the idle sweep runs this often, so an idle connection lives at most 1.25 x the timeout
            "cleanup_interval": max(1, int(config.idle_timeout_s // 4)),
            "asyncore_use_poll": True, "max_request_header_size": config.max_header_bytes,
            "backlog": 2048}


class EnvelopeErrorTask(ErrorTask):
    def execute(self):
        status = self.request.error.code
        body = orjson.dumps(error(code_for_status(status), _MESSAGES.get(status, self.request.error.reason)))
        self.status = f"{status} {self.request.error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class WholeResponseTask(WSGITask):
    """A response whose body comes in one piece (every JSON answer) leaves in one write: the
    head and the body in one send, one TCP segment. Fronts flush every write at once
    (send_bytes 1, for streamed tokens), so waitress' own write sent the head and the body
    apart: two sends, two segments, two wake-ups of the client (measured side by side, 3 rounds,
    mlp_small: CPU per request at c=8 0.76 -> 0.64 ms, req/s 1641 -> 2038; c=32 unchanged). A
    streamed, chunked or file body is written as waitress writes it."""

    def write(self, data):
        if (not self.wrote_header and self.complete and data and self.has_body and not self.chunked_response
                and self.content_length == len(data)):
            self.channel.write_soon(self.build_response_header() + data)
            self.wrote_header = True
            self.content_bytes_written += len(data)
            return
        super().write(data)

    def build_response_header(self):
        """waitress' response head, the same bytes (tests/test_serving_processes.py compares them),
        in one pass for the common case: HTTP/1.1, a body of known length, no Connection: close
        asked, no Date or Server header from the app. waitress re-capitalizes every header name
        (split, capitalize, join) and formats the date on each response, 5.5 us with our six
        headers; names and the date of the current second are remembered here (2.2 us).
        Anything else is waitress' own code."""
        if (self.version != "1.1" or self.content_length is None or not self.has_body
                or self.request.headers.get("CONNECTION", "").lower() == "close"):
            return super().build_response_header()
        headers, content_length = [], None
        for name, value in self.response_headers:
            proper = _PROPER_NAMES.get(name)
            if proper is None:
                proper = "-".join([part.capitalize() for part in name.split("-")])
                if len(_PROPER_NAMES) < 512:  # an app's header names are few; never unbounded
                    _PROPER_NAMES[name] = proper
            if proper == "Content-Length":
                content_length = value
            elif proper in ("Date", "Server"):
                return super().build_response_header()
            headers.append((proper, value))
        if content_length is None:
            content_length = str(self.content_length)
            headers.append(("Content-Length", content_length))
        elif not content_length:
            return super().build_response_header()  # waitress turns an empty one into chunked
        ident = self.channel.server.adj.ident
        if ident:
            headers.append(("Server", ident))
        headers.append(("Date", _http_date(int(self.start_time))))
        self.response_headers = headers
        lines = [f"HTTP/1.1 {self.status}"]
        lines.extend([f"{name}: {value}" for name, value in sorted(headers, key=itemgetter(0))])
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_PROPER_NAMES: dict[str, str] = {}  # a header name as the app gave it -> as waitress writes it
_http_date = once_a_second(build_http_date)


class GuardedChannel(HTTPChannel):
    """An HTTPChannel whose request must finish arriving within the read deadlines, served on the
    front's one thread (serving/loop.py)."""

    task_class = WholeResponseTask
    error_task_class = EnvelopeErrorTask
    header_timeout_s = 10.0  # set per server by guard()
    body_timeout_s = 300.0
    request_started: float | None = None  # monotonic time the request being read began

    def received(self, data):
        if self.request is None and data:
            self.request_started = time.monotonic()
        result = super().received(data)
        if self.request is None:  # nothing partly read is left
            self.request_started = None
        return result

    def _flush_outbufs_below_high_watermark(self):
        # waitress waits on outbuf_lock for its loop thread to send; here the loop is this very
        # thread, so the request sleeps instead while the loop turns and the client takes its bytes
        high = self.adj.outbuf_high_watermark
        while self.connected and self.total_outbufs_len > high:
            self._flush_exception(self._flush_some, do_close=False)
            if self.connected and self.total_outbufs_len > high:
                self.server.task_dispatcher.sleep(0.005)

    def readable(self):
        # asked on every loop turn (at most 0.2 s apart), so a late request is dropped on time
        started = self.request_started
        if started is not None and self.request is not None and not self.requests:
            limit = self.body_timeout_s if self.request.headers_finished else self.header_timeout_s
            if time.monotonic() - started > limit:
                self.will_close = True  # writable() sees it; handle_write closes the socket
                return False
        return super().readable()


def guard(server, config) -> None:
    """Give the listeners of a waitress server (not yet looping) the guarded channel."""
    _raise_fd_limit(config.connection_limit + 256)
    channel_class = type("FrontChannel", (GuardedChannel,), {"header_timeout_s": config.header_timeout_s,
                                                              "body_timeout_s": config.body_timeout_s})
    listeners = [server] if hasattr(server, "_map") else server.map.values()  # one socket / several
    for listener in listeners:
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = channel_class


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))
