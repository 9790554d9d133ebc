"""Node configuration, read from a TOML file.

```toml
[node]
coordinator = "127.0.0.1:7443"   # the coordinator this node dials out to
state_dir = "state"              # relative to this file; identity-bound state lives here
policy = "policy.toml"           # the data holder's policy (relative to this file), optional

[tls]
cert = "hospital-a.pem"          # issued by `wharf ca issue --role node hospital-a`
key = "hospital-a.key"
ca = "ca.pem"

# [insecure]                     # plaintext experiments only (no TLS, no authentication)
# name = "hospital-a"
```

``node.policy`` names the policy file (see :mod:`wharf.node.policy` and
``docs/sovereignty.md``): which offered jobs the node refuses, approves by a
standing rule, or leaves to its operator. **Without a policy file every offered
job is "pending"**: the operator decides each one with ``wharf node grant
approve|deny JOB``. (The dataset's own registration still refuses by itself what
it forbids: a purpose its certificate does not allow, a prohibited column, core
data.) A configured policy file that is missing or malformed stops the daemon at
start with a message saying what to fix.

In plaintext mode (``[insecure]``) the node has no key: it still evaluates the
policy and checks its grants before every task, but signs nothing — no
registration certificates, grants, receipts or attestations are sent, and its
audit ledger stays empty. That is acceptable only for experiments.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The node configuration is missing or malformed."""


@dataclass(frozen=True)
class NodeConfig:
    path: Path
    coordinator: str
    state_dir: Path
    cert: Path | None
    key: Path | None
    ca: Path | None
    insecure_name: str | None = None
    max_backoff_s: float = 30.0
    task_workers: int = 4
    wire_log: Path | None = None
    policy: Path | None = None

    @property
    def insecure(self) -> bool:
        return self.insecure_name is not None


def _path(base: Path, value: Any, field: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field} must be a file path")
    p = Path(value)
    return p if p.is_absolute() else (base / p).resolve()


def load(path: Path) -> NodeConfig:
    """Read a node config file; relative paths are relative to the file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"node config not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    base = path.resolve().parent
    unknown = sorted(set(raw) - {"node", "tls", "insecure"})
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] in {path}; valid: node, tls, insecure")
    node = raw.get("node", {})
    extra = sorted(
        set(node)
        - {"coordinator", "state_dir", "max_backoff_s", "task_workers", "wire_log", "policy"}
    )
    if extra:
        raise ConfigError(f"unknown field node.{extra[0]} in {path}")
    coordinator = node.get("coordinator")
    if not isinstance(coordinator, str) or ":" not in coordinator:
        raise ConfigError(f"node.coordinator must be 'host:port' in {path}")
    state_dir = _path(base, node.get("state_dir", "state"), "node.state_dir")
    wire_log = _path(base, node["wire_log"], "node.wire_log") if "wire_log" in node else None
    policy = _path(base, node["policy"], "node.policy") if "policy" in node else None
    insecure = raw.get("insecure")
    tls = raw.get("tls")
    if insecure is not None:
        name = insecure.get("name") if isinstance(insecure, dict) else None
        if not isinstance(name, str) or not name:
            raise ConfigError('[insecure] needs name = "NODE-NAME"')
        return NodeConfig(
            path,
            coordinator,
            state_dir,
            None,
            None,
            None,
            insecure_name=name,
            wire_log=wire_log,
            policy=policy,
        )
    if not isinstance(tls, dict):
        raise ConfigError(
            f"{path} has no [tls] section; give cert, key and ca "
            "(issue them with `wharf ca issue --role node NAME`)"
        )
    return NodeConfig(
        path=path,
        coordinator=coordinator,
        state_dir=state_dir,
        cert=_path(base, tls.get("cert"), "tls.cert"),
        key=_path(base, tls.get("key"), "tls.key"),
        ca=_path(base, tls.get("ca"), "tls.ca"),
        max_backoff_s=float(node.get("max_backoff_s", 30.0)),
        task_workers=int(node.get("task_workers", 4)),
        wire_log=wire_log,
        policy=policy,
    )


def write(
    path: Path,
    *,
    coordinator: str,
    state_dir: str,
    cert: str,
    key: str,
    ca: str,
    policy: str | None = None,
) -> None:
    """Write a config file (used by tests and tools)."""
    policy_line = f'policy = "{policy}"\n' if policy else ""
    path.write_text(
        "[node]\n"
        f'coordinator = "{coordinator}"\n'
        f'state_dir = "{state_dir}"\n'
        f"{policy_line}\n"
        "[tls]\n"
        f'cert = "{cert}"\nkey = "{key}"\nca = "{ca}"\n',
        encoding="utf-8",
    )
