"""Python SDK: one method per endpoint, typed errors, retry after 429, wait() for async jobs.

    client = MSmartComputeClient("http://localhost:8080/api/v1", "your-api-key")
    client.load_model({"model_id": "m", "model_type": "mlp", "parameters": {...}})
    result = client.inference("m", [[0.1, 0.2, 0.3]])   # lists or numpy arrays

Every method returns the answer's fields without the envelope (`success`, `error`, `timestamp`);
the list methods (list_models, list_allocations, list_virtual_gpus, list_jobs, metrics_history)
return the list and metrics() the metrics object, as in the JS SDK. An error answer raises the
MSmartComputeError subclass of its code; no answer at all (refused, reset, timed out) raises
ConnectionFailedError. One keep-alive connection per thread is reused across calls.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse

ENVELOPE_FIELDS = ("success", "error", "timestamp")


class MSmartComputeError(Exception):
    """An error answer of the API: `code` is the seed's error code."""

    code = "UNKNOWN"

    def __init__(self, code: str, message: str, details: dict | None = None, status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.details, self.status = code, message, details or {}, status


class InvalidModelIdError(MSmartComputeError): code = "INVALID_MODEL_ID"  # noqa: E701
class ModelAlreadyLoadedError(MSmartComputeError): code = "MODEL_ALREADY_LOADED"  # noqa: E701
class InsufficientMemoryError(MSmartComputeError): code = "INSUFFICIENT_MEMORY"  # noqa: E701
class InvalidInputDataError(MSmartComputeError): code = "INVALID_INPUT_DATA"  # noqa: E701
class RequestTimeoutError(MSmartComputeError): code = "REQUEST_TIMEOUT"  # noqa: E701
class RateLimitExceededError(MSmartComputeError): code = "RATE_LIMIT_EXCEEDED"  # noqa: E701
class UnauthorizedError(MSmartComputeError): code = "UNAUTHORIZED"  # noqa: E701
class ForbiddenError(MSmartComputeError): code = "FORBIDDEN"  # noqa: E701
class NotFoundError(MSmartComputeError): code = "NOT_FOUND"  # noqa: E701
class JobFailedError(MSmartComputeError): code = "JOB_FAILED"  # noqa: E701
class ConnectionFailedError(MSmartComputeError):  # noqa: E302
    """No answer from the server (refused, unreachable, reset, timed out): not an API error code."""
    code = "CONNECTION_FAILED"

_ERRORS = {cls.code: cls for cls in MSmartComputeError.__subclasses__()}


def _json_default(value):
    """numpy arrays and scalars (and anything with .tolist(), e.g. a CPU torch tensor) as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot send a {type(value).__name__} as JSON")


# A kept-alive connection the server closed while idle fails on first use: reconnect once.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.CannotSendRequest)


class MSmartComputeClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8080/api/v1", api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3):
        self.base_url = base_url.rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port]/api/v1, got {base_url!r}")
        self._scheme, self._netloc, self._prefix = parts.scheme, parts.netloc, parts.path
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.max_retries = max_retries
        self._local = threading.local()  # http.client connections are not thread-safe: one per thread

    # --- transport -------------------------------------------------------------------
    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection and whether it was used before."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        self._local.conn = cls(self._netloc, timeout=self.timeout)
        return self._local.conn, False

    def close(self) -> None:
        """Close this thread's connection (the next call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, method: str, target: str, data: bytes | None) -> tuple[int, dict, bytes]:
        while True:
            conn, reused = self._connection()
            try:
                conn.request(method, target, body=data, headers=self.headers)
                response = conn.getresponse()
                payload = response.read()
            except _STALE as err:
                self.close()
                if reused:
                    continue  # the server closed it while idle: once more on a fresh connection
                raise ConnectionFailedError("CONNECTION_FAILED", f"{self.base_url} closed the connection: {err}",
                                            {"url": self.base_url + target}) from None
            except (OSError, http.client.HTTPException) as err:  # refused, unreachable, timed out
                self.close()
                reason = "no answer within {:g} s".format(self.timeout) if isinstance(err, TimeoutError) else err
                raise ConnectionFailedError("CONNECTION_FAILED", f"cannot reach {self.base_url}: {reason}",
                                            {"url": self.base_url + target}) from None
            if response.will_close:
                self.close()
            return response.status, dict(response.getheaders()), payload

    def _request(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> dict:
        target = self._prefix + path
        if params:
            target += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        data = None if body is None else json.dumps(body, default=_json_default).encode()
        for attempt in range(self.max_retries + 1):
            status, headers, payload = self._send(method, target, data)
            if status == 429 and headers.get("Retry-After") and attempt < self.max_retries:
                time.sleep(float(headers["Retry-After"]))
                continue
            if status >= 400:
                raise self._error(status, payload)
            try:
                answer = json.loads(payload)
            except ValueError:
                raise MSmartComputeError(f"HTTP_{status}", "the answer is not JSON", {}, status) from None
            return {k: v for k, v in answer.items() if k not in ENVELOPE_FIELDS} if isinstance(answer, dict) \
                else answer
        raise AssertionError("unreachable")

    @staticmethod
    def _error(status: int, payload: bytes) -> MSmartComputeError:
        try:
            error = json.loads(payload)["error"]
            code, message, details = error["code"], error["message"], error.get("details")
        except (ValueError, KeyError, TypeError):
            code, message, details = f"HTTP_{status}", payload[:200].decode(errors="replace"), {}
        return _ERRORS.get(code, MSmartComputeError)(code, message, details, status)

    # --- health --------------------------------------------------------------------------
    def health(self) -> dict:
        return self._request("GET", "/health")

    # --- models ----------------------------------------------------------------------------
    def load_model(self, model_config: dict) -> dict:
        return self._request("POST", "/models", model_config)

    def list_models(self) -> list[dict]:
        return self._request("GET", "/models")["models"]

    def get_model(self, model_id: str) -> dict:
        return self._request("GET", f"/models/{urllib.parse.quote(model_id, safe='')}")

    def unload_model(self, model_id: str) -> dict:
        return self._request("DELETE", f"/models/{urllib.parse.quote(model_id, safe='')}")

    # --- inference -------------------------------------------------------------------------
    def _inference_body(self, model_id, input_data, options, fields) -> dict:
        return {"model_id": model_id, "input_data": input_data, "options": options or {}, **fields}

    def inference(self, model_id: str, input_data, options: dict | None = None, **fields) -> dict:
        return self._request("POST", "/inference", self._inference_body(model_id, input_data, options, fields))

    def inference_async(self, model_id: str, input_data, options: dict | None = None, **fields) -> dict:
        return self._request("POST", "/inference/async", self._inference_body(model_id, input_data, options, fields))

    def get_inference(self, request_id: str) -> dict:
        return self._request("GET", f"/inference/{urllib.parse.quote(request_id, safe='')}")

    def batch_inference(self, requests: list[dict]) -> dict:
        return self._request("POST", "/inference/batch", {"requests": requests})

    def wait(self, request_id: str, timeout: float = 300.0, poll_interval: float = 0.05,
             kind: str = "inference", on_progress=None) -> dict:
        """Poll an async job (kind "inference" or "training") until it completes; raises
        JobFailedError (failed or cancelled) or RequestTimeoutError. on_progress(result) is
        called after each poll."""
        deadline = time.monotonic() + timeout
        getter = {"inference": self.get_inference, "training": self.get_training}[kind]
        while True:
            result = getter(request_id)
            if on_progress is not None:
                on_progress(result)
            if result["status"] == "completed":
                return result
            if result["status"] in ("failed", "cancelled"):
                error = result.get("error") or {}
                raise JobFailedError("JOB_FAILED", f"{request_id} {result['status']}: {error.get('message', 'unknown')}",
                                     {"request_id": request_id, "error": error})
            if time.monotonic() > deadline:
                raise RequestTimeoutError("REQUEST_TIMEOUT", f"{request_id} still {result['status']} after {timeout}s")
            time.sleep(poll_interval)
            poll_interval = min(poll_interval * 1.5, 1.0)

    # --- training ---------------------------------------------------------------------------
    @staticmethod
    def _training_body(model_id, training_data, labels, fields) -> dict:
        body = {"model_id": model_id, "training_data": training_data, **fields}
        if labels is not None:
            body["labels"] = labels
        return body

    def train(self, model_id: str, training_data, labels=None, **fields) -> dict:
        """Synchronous training; fields: epochs, learning_rate, optimizer, loss_function,
        hyperparameters, seed, save_path."""
        return self._request("POST", "/training", self._training_body(model_id, training_data, labels, fields))

    def train_async(self, model_id: str, training_data, labels=None, **fields) -> dict:
        return self._request("POST", "/training/async",
                             self._training_body(model_id, training_data, labels, fields))

    def get_training(self, request_id: str) -> dict:
        return self._request("GET", f"/training/{urllib.parse.quote(request_id, safe='')}")

    def cancel_training(self, request_id: str) -> dict:
        """DELETE /training/{id} (an extension): a queued training ends at once, a running one at
        its next mini-batch."""
        return self._request("DELETE", f"/training/{urllib.parse.quote(request_id, safe='')}")

    # --- optimization ------------------------------------------------------------------------
    def optimize_model(self, model_id: str, optimization_type: str = "quantization",
                       target_precision: str | None = None, calibration_data=None,
                       options: dict | None = None) -> dict:
        body = {"optimization_type": optimization_type, "options": options or {}}
        if target_precision is not None:
            body["target_precision"] = target_precision
        if calibration_data is not None:
            body["calibration_data"] = calibration_data
        return self._request("POST", f"/models/{urllib.parse.quote(model_id, safe='')}/optimize", body)

    def list_jobs(self, limit: int = 50) -> list[dict]:
        """The latest async inference and training jobs, newest first."""
        return self._request("GET", "/jobs", params={"limit": limit})["jobs"]

    # --- sessions --------------------------------------------------------------------------
    def create_session(self, user_id: str, model_id: str) -> dict:
        return self._request("POST", "/sessions", {"user_id": user_id, "model_id": model_id})

    def get_session(self, session_id: str) -> dict:
        return self._request("GET", f"/sessions/{urllib.parse.quote(session_id, safe='')}")

    def end_session(self, session_id: str) -> dict:
        return self._request("DELETE", f"/sessions/{urllib.parse.quote(session_id, safe='')}")

    # --- metrics ---------------------------------------------------------------------------
    def metrics(self) -> dict:
        return self._request("GET", "/metrics")["metrics"]

    def metrics_history(self, start_time: str | None = None, end_time: str | None = None,
                        interval: int = 60) -> list[dict]:
        params = {"start_time": start_time, "end_time": end_time, "interval": interval}
        return self._request("GET", "/metrics/history", params=params)["history"]

    # --- resources -------------------------------------------------------------------------
    def allocate_resources(self, user_id: str, memory_size: int, compute_units: int, duration: int) -> dict:
        return self._request("POST", "/resources", {"user_id": user_id, "memory_size": memory_size,
                                                    "compute_units": compute_units, "duration": duration})

    def list_allocations(self) -> list[dict]:
        return self._request("GET", "/resources")["allocations"]

    def get_allocation(self, allocation_id: str) -> dict:
        return self._request("GET", f"/resources/{urllib.parse.quote(allocation_id, safe='')}")

    def deallocate_resources(self, allocation_id: str) -> dict:
        return self._request("DELETE", f"/resources/{urllib.parse.quote(allocation_id, safe='')}")

    # --- virtualization ----------------------------------------------------------------------
    def create_virtual_gpu(self, virtual_gpu_id: str, memory_size: int, compute_units: int,
                           scheduling_policy: str = "round_robin", **fields) -> dict:
        return self._request("POST", "/virtualization/gpus", {
            "virtual_gpu_id": virtual_gpu_id, "memory_size": memory_size, "compute_units": compute_units,
            "scheduling_policy": scheduling_policy, **fields})

    def list_virtual_gpus(self) -> list[dict]:
        return self._request("GET", "/virtualization/gpus")["virtual_gpus"]

    def get_virtual_gpu(self, virtual_gpu_id: str) -> dict:
        return self._request("GET", f"/virtualization/gpus/{urllib.parse.quote(virtual_gpu_id, safe='')}")

    def destroy_virtual_gpu(self, virtual_gpu_id: str) -> dict:
        return self._request("DELETE", f"/virtualization/gpus/{urllib.parse.quote(virtual_gpu_id, safe='')}")
