"""A local federation of real processes on loopback, with real mTLS.

Used by ``wharf demo`` and by the end-to-end tests: it creates a deployment CA
and certificates in a directory, starts a coordinator process and node
processes (each with its own config, state and registered dataset), and hands
out developer/operator clients. Processes are started with the same Python
interpreter, so it works from a virtualenv without activation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from wharf.identity import init_ca, issue

STARTUP_TIMEOUT_S = 60.0

DEMO_POLICY = """\
# This hospital's data policy (see node/policy.py for every field).
allowed_purposes = ["medical-research"]

[levels.general]
secure_aggregation = false   # plaintext jobs allowed on general data (demo/tests compare both)

[[auto_approve]]             # standing rule: alice's medical research on general data
requester = "alice"
purpose = "medical-research"
max_level = "general"
"""


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class LocalFederation:
    """Certificates, a coordinator and nodes under one directory."""

    root: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    port: int = 0
    node_options: dict[str, dict[str, str]] = field(default_factory=dict)
    """Extra ``[node]`` settings per node name (e.g. ``{"wire_log": "sent.log"}``)."""
    policies: dict[str, str] = field(default_factory=dict)
    """Policy TOML per node name (default: :data:`DEMO_POLICY`)."""

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.ca_dir = self.root / "ca"
        self.certs = self.root / "certs"
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        if not (self.ca_dir / "ca.pem").exists():
            init_ca(self.ca_dir)
        self.ca_pem = self.ca_dir / "ca.pem"

    # -- identities -----------------------------------------------------------------
    def identity(self, role: str, name: str) -> tuple[Path, Path]:
        """Issue (once) and return (cert, key) for ``name``."""
        cert, key = self.certs / f"{name}.pem", self.certs / f"{name}.key"
        if not cert.exists():
            issue(self.ca_dir, role, name, self.certs)
        return cert, key

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- processes ------------------------------------------------------------------
    def _spawn(self, proc: Proc) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        logf = proc.log.open("ab")
        proc.popen = subprocess.Popen(
            [sys.executable, "-m", "wharf.cli", *proc.args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.root,
            start_new_session=True,
        )
        logf.close()
        self.procs[proc.name] = proc

    def start_coordinator(self, extra: list[str] | None = None) -> None:
        cert, key = self.identity("coordinator", "coordinator")
        port_file = self.root / "coordinator.port"
        port_file.unlink(missing_ok=True)
        listen = f"127.0.0.1:{self.port}"  # 0 on first start; the same port on restart
        args = [
            "coordinator",
            "start",
            "--listen",
            listen,
            "--data-dir",
            str(self.root / "coordinator"),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--ca",
            str(self.ca_pem),
            "--port-file",
            str(port_file),
            *(extra or []),
        ]
        proc = Proc("coordinator", args, self.logs / "coordinator.log")
        self._spawn(proc)
        deadline = time.time() + STARTUP_TIMEOUT_S
        while not port_file.exists():
            if not proc.alive():
                raise RuntimeError(f"coordinator exited at start:\n{self.tail('coordinator')}")
            if time.time() > deadline:
                raise RuntimeError("coordinator did not start in time")
            time.sleep(0.1)
        self.port = int(port_file.read_text().strip())

    def node_config(self, name: str) -> Path:
        cert, key = self.identity("node", name)
        home = self.root / "nodes" / name
        home.mkdir(parents=True, exist_ok=True)
        config = home / "node.toml"
        (home / "policy.toml").write_text(self.policies.get(name, DEMO_POLICY), encoding="utf-8")
        options = {"policy": "policy.toml", **self.node_options.get(name, {})}
        extra = "".join(f'{k} = "{v}"\n' for k, v in options.items())
        config.write_text(
            "[node]\n"
            f'coordinator = "{self.address}"\n'
            'state_dir = "state"\n'
            "max_backoff_s = 2.0\n"
            f"{extra}\n"
            "[tls]\n"
            f'cert = "{cert}"\nkey = "{key}"\nca = "{self.ca_pem}"\n',
            encoding="utf-8",
        )
        return config

    def register_dataset(
        self,
        node: str,
        dataset: str,
        path: Path,
        label: str,
        features: list[str] | None = None,
        *,
        purposes: tuple[str, ...] = ("medical-research",),
        extra: tuple[str, ...] = (),
    ) -> None:
        """Register a dataset at a node, through the real CLI."""
        config = self.node_config(node)
        args = ["node", "dataset", "add", dataset, str(path), "--label", label, "--replace"]
        if features:
            args += ["--features", ",".join(features)]
        for p in purposes:
            args += ["--purpose", p]
        self.node_cli(node, [*args, *extra], config)

    def node_cli(self, node: str, args: list[str], config: Path | None = None) -> str:
        """Run a ``wharf node …`` command as the node's operator would; returns its output."""
        config = config or self.root / "nodes" / node / "node.toml"
        res = subprocess.run(
            [sys.executable, "-m", "wharf.cli", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=self.root,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"`wharf {' '.join(args)}` failed: {res.stdout}{res.stderr}")
        return res.stdout

    def start_node(self, name: str) -> None:
        config = self.node_config(name)
        proc = Proc(name, ["node", "start", "--config", str(config)], self.logs / f"{name}.log")
        self._spawn(proc)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process (SIGKILL by default: no cleanup, like a crash)."""
        proc = self.procs[name]
        if proc.popen is not None and proc.popen.poll() is None:
            os.killpg(proc.popen.pid, sig)
            proc.popen.wait(timeout=30)

    def restart(self, name: str) -> None:
        proc = self.procs[name]
        if name == "coordinator":
            self.start_coordinator(proc.args[proc.args.index("--port-file") + 2 :])
        else:
            self._spawn(proc)

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def client(self, name: str = "alice", role: str = "developer"):  # type: ignore[no-untyped-def]
        from wharf.client import Client

        cert, key = self.identity(role, name)
        return Client(self.address, cert=cert, key=key, ca=self.ca_pem)

    def wait_for_nodes(self, names: list[str], timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until every named node is online at the coordinator."""
        deadline = time.time() + timeout
        with self.client("wharf-admin", "operator") as c:
            while True:
                online = {n.name for n in c.nodes() if n.online}
                if set(names) <= online:
                    return
                for n in names:
                    if n in self.procs and not self.procs[n].alive():
                        raise RuntimeError(f"node {n} exited:\n{self.tail(n)}")
                if time.time() > deadline:
                    raise RuntimeError(f"nodes not online in time: {set(names) - online}")
                time.sleep(0.2)

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.alive():
                assert proc.popen is not None
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in self.procs.values():
            if proc.popen is not None:
                try:
                    proc.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                    proc.popen.wait()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
