"""The serving processes (see docs/ARCHITECTURE.md, "Processes"): the supervisor
(`msmartcompute serve`), N front processes (waitress + the Falcon app, HTTP only) and one engine
process (the Runtime), joined by ZeroMQ ipc:// sockets carrying msgspec messages."""
