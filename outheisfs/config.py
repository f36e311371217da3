"""The configuration file (`outheis.toml`), parsed and checked with pydantic.

Every key is validated at mount time, also those whose behaviour lives in other
modules: a typo is an error that names the key, never a silent default.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .names import OPERATOR
from .operators import Operators
from .routing import Topic, compile_topic

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
HOST_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")  # a subject token or dotted tokens
Priority = Literal["interactive", "normal", "background"]
Restart = Literal["permanent", "transient", "temporary"]
Durability = Literal["process", "disk"]
AckMode = Literal["auto", "explicit"]
Perms = Literal["r", "w", "rw"]
FilePerms = Literal["r", "w", "rw", "x"]
Confine = Literal["required", "best-effort", "off"]
VaultEvents = Literal["all", "off"]
NET_RE = re.compile(r"(connect|bind):([0-9]{1,5})")
TOPIC_PREFIX = "topics/"  # in `send`: the right to write topics/NAME
PRIORITIES: tuple[Priority, ...] = ("interactive", "normal", "background")


AGE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def retention(rule: str | int) -> tuple[str, float]:
    """`retain` as ("events", N) or ("age", seconds); ValueError for anything else."""
    if isinstance(rule, int) and not isinstance(rule, bool):
        if rule < 1:
            raise ValueError("must be at least 1 event")
        return "events", float(rule)
    if isinstance(rule, str):
        m = AGE_RE.fullmatch(rule.strip())
        if m:
            return "age", float(m.group(1)) * AGE_UNITS[m.group(2)]
    raise ValueError('must be an age like "7d", "12h", "30m", "90s", or a count of events')


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


MAX_INSTANCES = 64


class Pool(BaseModel):
    """`instances = { min, max }`: the supervisor decides how many run (scaling.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    min: int = Field(default=1, ge=1, le=MAX_INSTANCES)
    max: int = Field(default_factory=lambda: min(MAX_INSTANCES, os.cpu_count() or 1), ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> Pool:
        if self.max > MAX_INSTANCES:
            raise ValueError(f"max {self.max} is more than {MAX_INSTANCES}")
        if self.max < self.min:
            raise ValueError(f"max {self.max} is less than min {self.min}")
        return self


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    command: list[str] | None = None
    priority: Priority = "normal"
    restart: Restart = "permanent"
    max_restarts: int = Field(default=3, ge=0)
    restart_window: float = Field(default=5.0, gt=0)
    instances: int | Pool = 1
    scale_after: float | None = Field(default=None, gt=0)  # pool: queue age before one more
    scale_idle: float | None = Field(default=None, gt=0)  # pool: idle time before one less
    send: list[str] = Field(default_factory=list)
    unveil: dict[str, Perms] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    # Workflows: how messages are acknowledged, and what may be held for how long.
    ack: AckMode = "auto"
    max_inflight: int = Field(default=20, ge=1, le=100_000)  # explicit: held at once
    ack_wait: float = Field(default=600.0, ge=0)  # explicit: seconds held unacked; 0 = forever
    cooldown: float = Field(default=60.0, ge=0)  # failed: seconds before a start; 0 = never
    files: dict[str, FilePerms] = Field(default_factory=dict)  # host paths beyond the defaults
    net: list[str] | Literal["all"] = Field(default_factory=list)  # TCP it may use
    host: str | list[str] | None = None  # with [cluster]: where its processes run
    # Messages to it from these senders ("*": anyone) wait for the operator's approval.
    approve: list[str] | Literal["*"] = Field(default_factory=list)

    def gated(self, sender: str) -> bool:
        """Whether a message from `sender` waits for the operator's approval."""
        return self.approve == "*" or "*" in self.approve or sender in self.approve

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | list[str] | None) -> str | list[str] | None:
        for h in [v] if isinstance(v, str) else v or []:
            if not HOST_RE.fullmatch(h) or len(h) > 64:
                raise ValueError(f"host {h!r} must match {HOST_RE.pattern}")
        if isinstance(v, list) and not v:
            raise ValueError("host must name at least one host")
        return v

    @field_validator("instances", mode="before")
    @classmethod
    def _instances(cls, v: object) -> object:
        if isinstance(v, dict):
            try:
                return Pool.model_validate(v)
            except ValidationError as e:
                err = e.errors()[0]
                key = ".".join(str(p) for p in err["loc"])
                why = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                why = why.removeprefix("Value error, ")
                raise ValueError(f"{key}: {why}" if key else why) from None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be a number or { min = M, max = N }")
        if not 1 <= v <= MAX_INSTANCES:
            raise ValueError(f"must be 1 to {MAX_INSTANCES}")
        return v

    @field_validator("scale_after", "scale_idle")
    @classmethod
    def _scaling(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and not isinstance(info.data.get("instances"), Pool):
            raise ValueError("only for a pool that sizes itself: instances = { min = M, max = N }")
        return v

    @property
    def floor(self) -> int:
        """The fewest instances: `min` of a pool, else `instances`."""
        return self.instances.min if isinstance(self.instances, Pool) else self.instances

    @property
    def ceiling(self) -> int:
        """The most instances: `max` of a pool, else `instances`."""
        return self.instances.max if isinstance(self.instances, Pool) else self.instances

    @property
    def pool(self) -> bool:
        """Whether the supervisor sizes it (`instances = { min, max }`)."""
        return isinstance(self.instances, Pool)

    @property
    def after(self) -> float:
        """Seconds the oldest queued message waits before one more instance starts."""
        return 1.0 if self.scale_after is None else self.scale_after

    @property
    def idle(self) -> float:
        """Seconds an instance waits idle on its inbox before it is stopped."""
        return 30.0 if self.scale_idle is None else self.scale_idle

    @property
    def hosts(self) -> list[str]:
        """The hosts its processes may run on, in order of preference."""
        return [self.host] if isinstance(self.host, str) else list(self.host or [])

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not v[0]):
            raise ValueError("command must name a program")
        return v

    @field_validator("unveil")
    @classmethod
    def _unveil(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            if not path.startswith("/") or "/../" in path + "/" or "/./" in path + "/":
                raise ValueError(f"unveil path {path!r} must be absolute within the mount")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            if not path.startswith("/") or "/../" in path + "/" or "/./" in path + "/":
                raise ValueError(f"files path {path!r} must be an absolute host path")
        return v

    @field_validator("net", mode="before")
    @classmethod
    def _net_shape(cls, v: object) -> object:
        if isinstance(v, str) and v != "all":
            raise ValueError(f'net {v!r} is not "all" nor a list like ["connect:443"]')
        return v

    @field_validator("net")
    @classmethod
    def _net(cls, v: list[str] | str) -> list[str] | str:
        for item in v if isinstance(v, list) else ():
            m = NET_RE.fullmatch(item)
            if m is None or int(m[2]) > 65535:
                raise ValueError(
                    f"net entry {item!r} is not connect:PORT or bind:PORT (PORT 0-65535)"
                )
        return v


class RuleConfig(BaseModel):
    """`[[topics.NAME.rule]]`: further destinations of the messages it matches."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    match: dict[str, Any] = Field(default_factory=dict)
    deliver: list[str] = Field(min_length=1)


class TopicConfig(BaseModel):
    """`[topics.NAME]`: shown as `topics/NAME`; what is written there fans out."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    deliver: list[str] = Field(default_factory=list)
    rule: list[RuleConfig] = Field(default_factory=list)

    def compiled(self, name: str) -> Topic:
        return compile_topic(name, self.deliver, ((r.match, r.deliver) for r in self.rule))


class ClusterConfig(BaseModel):
    """`[cluster]`: several hosts on one event log kept by NATS JetStream."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    servers: list[str] = Field(min_length=1)
    stream: str = Field(default="outheis", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    replicas: int = Field(default=3, ge=1, le=5)
    host_timeout: float = Field(default=10.0, gt=0)
    write_timeout: float = Field(default=30.0, gt=0)  # s: a write not stored by then fails
    credentials: str | None = None  # a NATS .creds file
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        for url in v:
            if not re.fullmatch(r"(nats|tls)://[^\s/]+", url):
                raise ValueError(f"server {url!r} must be nats://HOST:PORT or tls://HOST:PORT")
        return v


class Config(BaseModel):
    """The whole file; every key has its default (docs/reference.md §2)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    durability: Durability = "process"
    confine: Confine = "required"  # Landlock for agents' processes
    max_queue: int = Field(default=10_000, ge=1)
    max_message: int = Field(default=1 << 20, ge=64)
    max_attempts: int = Field(default=5, ge=1)
    aging: float = Field(default=10.0, gt=0)
    stop_grace: float = Field(default=5.0, ge=0)
    # What one agent may hold of the server at once (the operator is not limited):
    max_waiting: int = Field(default=64, ge=1)  # requests parked: blocked reads and writes
    max_unfinished: int = Field(default=16 << 20, ge=64)  # bytes of unterminated lines
    output_max: int = Field(default=10 << 20, ge=4096)  # bytes of agents/NAME/output, rotated
    # The log's checkpoints and bound (checkpoint.py, retain.py):
    checkpoint_every: int = Field(default=100_000, ge=1)  # events between checkpoints
    retain: str | int | None = None  # an age ("7d") or a count of events; None: all

    @field_validator("retain")
    @classmethod
    def _retain(cls, v: str | int | None) -> str | int | None:
        if v is not None:
            retention(v)
        return v

    vault_events: VaultEvents = "all"  # "off": changes in the vault are not logged
    agents: dict[str, AgentConfig] = Field(default_factory=dict)
    vault: dict[str, str] = Field(default_factory=dict)
    topics: dict[str, TopicConfig] = Field(default_factory=dict)
    # Users whose processes act as the operator, beside the mounting user and root:
    operators: list[str | int] = Field(default_factory=list)
    cluster: ClusterConfig | None = None
    home: Path = Field(default=Path("."), exclude=True)

    def check_names(self) -> None:
        if self.max_unfinished < self.max_message:
            raise ConfigError(
                f"max_unfinished: {self.max_unfinished} is less than max_message "
                f"({self.max_message}): an agent could not write one whole message"
            )
        for name, agent in self.agents.items():
            if name == OPERATOR:
                raise ConfigError(f"agents.{name}: 'user' is reserved for the operator")
            if not valid_name(name):
                raise ConfigError(f"agents.{name}: agent name must match {NAME_RE.pattern}")
            if self.cluster is not None and agent.command is not None and agent.host is None:
                raise ConfigError(
                    f"agents.{name}.host: missing: with [cluster], an agent with a command "
                    "must name the host(s) its processes run on"
                )
            for target in agent.send:
                if target.startswith(TOPIC_PREFIX):
                    if target.removeprefix(TOPIC_PREFIX) not in self.topics:
                        raise ConfigError(f"agents.{name}.send: unknown topic {target!r}")
                elif target != "*" and target != OPERATOR and target not in self.agents:
                    raise ConfigError(f"agents.{name}.send: unknown agent {target!r}")
            if agent.approve != "*":
                for sender in agent.approve:
                    if sender not in ("*", OPERATOR) and sender not in self.agents:
                        raise ConfigError(f"agents.{name}.approve: unknown agent {sender!r}")
        self.check_vault()
        self.check_topics()
        Operators.resolve(self.operators)  # an unknown user or group names the key

    def check_vault(self) -> None:
        for domain, owner in self.vault.items():
            if not valid_name(domain):
                raise ConfigError(f"vault.{domain}: domain name must match {NAME_RE.pattern}")
            if owner != OPERATOR and owner not in self.agents:
                raise ConfigError(
                    f"vault.{domain}: unknown owner agent {owner!r} "
                    '(an agent of the config, or "user" for the operator)'
                )

    def check_topics(self) -> None:
        """Names, rules (their tests compiled) and destinations, checked at mount."""
        for name, topic in self.topics.items():
            if not valid_name(name):
                raise ConfigError(f"topics.{name}: topic name must match {NAME_RE.pattern}")
            topic.compiled(name)
            keys = [(f"topics.{name}.deliver", topic.deliver)]
            keys += [
                (f"topics.{name}.rule.{i}.deliver", r.deliver) for i, r in enumerate(topic.rule)
            ]
            for key, targets in keys:
                for target in targets:
                    if target != OPERATOR and target not in self.agents:
                        raise ConfigError(f"{key}: unknown agent {target!r}")


def _key_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_config(text: str, home: Path, source: str = "config") -> Config:
    """Parse TOML text; raise ConfigError with one line that names the key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    if "home" in raw:
        raise ConfigError(f"{source}: home: unknown key")
    try:
        config = Config.model_validate({**raw, "home": home})
    except ValidationError as e:
        err = e.errors()[0]
        key = _key_path(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(f"{source}: {key}: {msg}") from None
    try:
        config.check_names()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


def load_config(path: Path | None) -> Config:
    """Load PATH, or `./outheis.toml` if it exists, else the empty config."""
    if path is None:
        default = Path("outheis.toml")
        if not default.exists():
            return Config(home=Path.cwd())
        path = default
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    return parse_config(text, path.resolve().parent, str(path))
