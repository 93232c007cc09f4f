"""Schemathesis hooks for the fuzz run (SCHEMATHESIS_HOOKS=fuzz_hooks): a 5xx is a failure
unless it is one of the documented, deliberate refusals (capacity, queue, deadline)."""
import schemathesis

DELIBERATE = {503: {"INSUFFICIENT_MEMORY", "QUEUE_FULL"}, 504: {"REQUEST_TIMEOUT"}}


@schemathesis.check
def no_unexpected_server_error(ctx, response, case):
    if response.status_code < 500:
        return None
    try:
        error = response.json()["error"]
    except Exception:
        raise AssertionError(f"{response.status_code} without the error envelope: {response.text[:300]!r}")
    if error.get("code") not in DELIBERATE.get(response.status_code, ()):
        raise AssertionError(f"server error {response.status_code} {error.get('code')}: {error.get('message')}")
    return None
