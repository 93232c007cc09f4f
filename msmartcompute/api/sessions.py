"""POST /sessions, GET/DELETE /sessions/{session_id}."""
from __future__ import annotations

from .envelope import ok
from .schemas import Session, parse


class SessionsResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        body = parse(req, Session)
        resp.media = ok(self.runtime.sessions.create(body["user_id"], body["model_id"], req.context.caller))


class SessionResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp, session_id):
        resp.media = ok(self.runtime.sessions.get(session_id, req.context.caller))

    def on_delete(self, req, resp, session_id):
        resp.media = ok(self.runtime.sessions.delete(session_id, req.context.caller))
