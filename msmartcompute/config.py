"""Server configuration: defaults < config file (JSON or TOML) < MSC_* env < flags.

File sections: [server] (host, port, state_dir, log_level, front_stall_timeout_s, max_body_bytes, cors_origins,
and the connection limits below),
[security] (api_keys = [{key, user_id, role}], require_keys, rate_limit_per_minute,
rate_limit_burst, rate_limit_enabled), [inference] and [virtualization] (fields of
runtime.engine.RuntimeConfig), and [[models]] (load specs preloaded at start).
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: Path = Path("var")
    log_level: str = "INFO"
    # A front whose one thread has not turned its loop for this long (wedged in a request) is
    # killed and replaced by the supervisor (serving/heartbeat.py).
    front_stall_timeout_s: float = 60.0
    max_body_bytes: int = 64 * 1024 * 1024
    cors_origins: list = field(default_factory=list)  # browser origins allowed cross-origin ("*": any)
    # What one front process accepts from the network (serving/connections.py applies them):
    connection_limit: int = 1000       # open connections per front; beyond, they wait in the listen backlog
    idle_timeout_s: float = 30.0       # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0     # request line + headers must have arrived within this ...
    body_timeout_s: float = 300.0      # ... and the whole body within this, however steadily it trickles
    max_header_bytes: int = 64 * 1024  # request line + headers; more is a 431
    rate_limit_per_minute: int = 1000
    rate_limit_burst: int = 100
    rate_limit_enabled: bool = True
    require_keys: bool = False     # never serve open, even before the first key exists
    api_keys: list = field(default_factory=list)   # [{key, user_id, role}] registered at start
    runtime: dict = field(default_factory=dict)    # RuntimeConfig fields from [inference]/[virtualization]
    models: list = field(default_factory=list)     # load specs preloaded at start


_CONNECTION_KEYS = ("connection_limit", "idle_timeout_s", "header_timeout_s", "body_timeout_s", "max_header_bytes")
_SERVER_KEYS = ("host", "port", "state_dir", "log_level", "max_body_bytes", "cors_origins",
                "front_stall_timeout_s", *_CONNECTION_KEYS)
_SECURITY_KEYS = ("rate_limit_per_minute", "rate_limit_burst", "rate_limit_enabled", "require_keys")
_ENV = {
    "host": "MSC_HOST", "port": "MSC_PORT", "state_dir": "MSC_STATE_DIR",
    "log_level": "MSC_LOG_LEVEL", "max_body_bytes": "MSC_MAX_BODY_BYTES",
    "rate_limit_per_minute": "MSC_RATE_LIMIT_PER_MINUTE", "rate_limit_burst": "MSC_RATE_LIMIT_BURST",
    "rate_limit_enabled": "MSC_RATE_LIMIT_ENABLED", "cors_origins": "MSC_CORS_ORIGINS",
    "require_keys": "MSC_REQUIRE_KEYS", "front_stall_timeout_s": "MSC_FRONT_STALL_TIMEOUT_S",
}
_INT_KEYS = {"port", "max_body_bytes", "rate_limit_per_minute", "rate_limit_burst", "connection_limit",
             "max_header_bytes"}
_POSITIVE_FLOAT_KEYS = {"idle_timeout_s", "header_timeout_s", "body_timeout_s", "front_stall_timeout_s"}


def _coerce(name: str, value):
    if name in _INT_KEYS:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if name in _POSITIVE_FLOAT_KEYS:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = 0.0
        if not seconds > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        return seconds
    if name == "state_dir":
        return Path(value)
    if name == "cors_origins":  # a list, or one comma-separated string (the environment variable)
        origins = value.split(",") if isinstance(value, str) else value
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise ValueError(f"cors_origins must be a list of origins, got {value!r}")
        return [o.strip().rstrip("/") for o in origins if o.strip()]
    if name in ("rate_limit_enabled", "require_keys"):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    return str(value)


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix == ".json":
        return json.loads(text)
    raise ValueError(f"config file {path}: expected a .json or .toml file")


def load_config(config_file: str | Path | None = None, overrides: dict | None = None,
                environ: dict | None = None) -> ServerConfig:
    environ = os.environ if environ is None else environ
    config = ServerConfig()
    data = read_config_file(config_file) if config_file else {}
    if not isinstance(data, dict) or not all(isinstance(data.get(name, {}), dict)
                                             for name in ("server", "security", "inference", "virtualization")):
        raise ValueError("config file: expected tables [server], [security], [inference], [virtualization]")
    unknown = set(data) - {"server", "security", "inference", "virtualization", "models"}
    if unknown:
        raise ValueError(f"config file: unknown section(s) {', '.join(sorted(unknown))}")
    for section, keys in (("server", _SERVER_KEYS), ("security", _SECURITY_KEYS)):
        for name, value in data.get(section, {}).items():
            if name == "api_keys" and section == "security":
                config.api_keys = list(value)
            elif name in keys:
                setattr(config, name, _coerce(name, value))
            else:
                raise ValueError(f"config file: unknown key {section}.{name}")
    config.runtime = {**data.get("inference", {}), **data.get("virtualization", {})}
    config.models = list(data.get("models", []))
    for name, var in _ENV.items():
        if environ.get(var):
            try:
                setattr(config, name, _coerce(name, environ[var]))
            except ValueError as exc:
                raise ValueError(f"environment variable {var}: {exc}") from None
    if environ.get("MSC_ADMIN_KEY"):  # bootstrap an admin key without a config file
        config.api_keys.append({"key": environ["MSC_ADMIN_KEY"], "user_id": environ.get("MSC_ADMIN_USER", "admin"),
                                "role": "admin"})
    for name, value in (overrides or {}).items():
        if value is not None:
            setattr(config, name, _coerce(name, value))
    return config
