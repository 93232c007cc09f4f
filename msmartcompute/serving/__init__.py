"""The serving processes (see docs/ARCHITECTURE.md, "Processes"): the supervisor
(`msmartcompute serve`), N front processes (waitress + the Falcon app, HTTP only) and one engine
process (the Runtime), joined by one Unix socket per front carrying msgspec messages; a front serves
every request on one thread, a greenlet each (loop.py)."""
