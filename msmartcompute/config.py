"""Server configuration: defaults < config file (JSON or TOML) < MSC_* env < flags."""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: Path = Path("var")
    threads: int = 8
    log_level: str = "INFO"
    extra: dict = field(default_factory=dict)  # sections later parts of the server read


_ENV = {"host": "MSC_HOST", "port": "MSC_PORT", "state_dir": "MSC_STATE_DIR",
        "threads": "MSC_THREADS", "log_level": "MSC_LOG_LEVEL"}


def _coerce(name: str, value):
    kind = {f.name: f.type for f in fields(ServerConfig)}[name]
    if kind in ("int", int):
        return int(value)
    if kind in ("Path", Path):
        return Path(value)
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
    server = data.get("server", {})
    for name in _ENV:
        if name in server:
            setattr(config, name, _coerce(name, server[name]))
    config.extra = {k: v for k, v in data.items() if k != "server"}
    for name, var in _ENV.items():
        if environ.get(var):
            setattr(config, name, _coerce(name, environ[var]))
    for name, value in (overrides or {}).items():
        if value is not None:
            setattr(config, name, _coerce(name, value))
    return config
