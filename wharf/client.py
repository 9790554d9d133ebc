"""The Python SDK for model developers and operators: ``wharf.Client``.

```python
import wharf
client = wharf.Client("127.0.0.1:7443", cert="alice.pem", key="alice.key", ca="ca.pem")
job = client.submit("job.toml")
for event in client.watch(job.job_id):
    print(event.kind, event.message)
client.download_model(job.job_id, "model.safetensors")
```

Every call carries a deadline; the model download is chunked and its SHA-256
verified before the file appears at the destination.
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from wharf import bundle as bundle_mod
from wharf import spec as spec_mod
from wharf.chunks import TransferError, receive_chunks
from wharf.identity import Identity
from wharf.proto import wharf_pb2 as pb
from wharf.proto import wharf_pb2_grpc as pb_grpc
from wharf.tls import insecure_channel, secure_channel

CALL_DEADLINE_S = 30.0
WATCH_DEADLINE_S = 24 * 3600.0
DOWNLOAD_DEADLINE_S = 3600.0
INSECURE_IDENTITY_HEADER = "x-wharf-insecure-identity"


def pack_bundle_for(spec: spec_mod.JobSpec) -> bytes:
    """Pack the spec's bundle directory with initial weights built from its model entry.

    The developer's code runs here, on the developer's machine: the coordinator
    only ever receives the resulting weights as safetensors.
    """
    import torch

    from wharf.algorithms import models

    if not spec.bundle.path:
        raise spec_mod.SpecError("bundle.path must name the bundle directory")
    root = Path(spec.bundle.path)
    build = bundle_mod.load_entry(root, spec.bundle.model)
    if not spec.model.input_shape:
        raise spec_mod.SpecError("a bundle job must set model.input_shape")
    torch.manual_seed(spec.training.seed)
    net = build(tuple(spec.model.input_shape), spec.model.num_classes)
    if not isinstance(net, torch.nn.Module):
        raise bundle_mod.BundleError(f"{spec.bundle.model} must return a torch.nn.Module")
    weights = models.weights_to_bytes(models.model_to_arrays(net))
    return bundle_mod.pack(root, extra={bundle_mod.INITIAL_WEIGHTS: weights})


class Client:
    """A connection to a coordinator's JobService."""

    def __init__(
        self,
        address: str,
        *,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ca: str | Path | None = None,
        insecure_identity: str | None = None,
    ) -> None:
        self._metadata: list[tuple[str, str]] = []
        if insecure_identity is not None:
            self._channel = insecure_channel(address)
            self._metadata = [(INSECURE_IDENTITY_HEADER, insecure_identity)]
        else:
            if cert is None or key is None or ca is None:
                raise ValueError("give cert, key and ca (or insecure_identity for plaintext mode)")
            self.identity = Identity.load(cert, key, ca)
            self._channel = secure_channel(address, self.identity)
        self._stub = pb_grpc.JobServiceStub(self._channel)

    @classmethod
    def from_env(cls) -> Client:
        """Build from WHARF_COORDINATOR, WHARF_CERT, WHARF_KEY and WHARF_CA."""
        address = os.environ.get("WHARF_COORDINATOR", "127.0.0.1:7443")
        if os.environ.get("WHARF_INSECURE_IDENTITY"):
            return cls(address, insecure_identity=os.environ["WHARF_INSECURE_IDENTITY"])
        return cls(
            address,
            cert=os.environ.get("WHARF_CERT"),
            key=os.environ.get("WHARF_KEY"),
            ca=os.environ.get("WHARF_CA"),
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float = CALL_DEADLINE_S) -> Any:
        return getattr(self._stub, method)(request, timeout=timeout, metadata=self._metadata)

    def submit(self, spec: spec_mod.JobSpec | str | Path) -> pb.JobInfo:
        """Submit a spec (a JobSpec or a TOML path); packs the bundle if it has one."""
        if not isinstance(spec, spec_mod.JobSpec):
            spec = spec_mod.load_toml(Path(spec))
        bundle = b""
        if spec.uses_bundle:
            bundle = pack_bundle_for(spec)
        request = pb.SubmitJobRequest(spec_json=spec.canonical_json(), bundle=bundle)
        return self._call("SubmitJob", request)  # type: ignore[no-any-return]

    def get(self, job_id: str) -> pb.JobInfo:
        return self._call("GetJob", pb.JobRef(job_id=job_id))  # type: ignore[no-any-return]

    def list(self, state: str = "", limit: int = 100) -> builtins.list[pb.JobInfo]:
        resp = self._call("ListJobs", pb.ListJobsRequest(state=state, limit=limit))
        return list(resp.jobs)

    def cancel(self, job_id: str) -> pb.JobInfo:
        return self._call("CancelJob", pb.JobRef(job_id=job_id))  # type: ignore[no-any-return]

    def nodes(self) -> builtins.list[pb.NodeInfo]:
        return list(self._call("ListNodes", pb.ListNodesRequest()).nodes)

    def watch(self, job_id: str, after_seq: int = 0) -> Iterator[pb.JobEvent]:
        """Stream the job's events until it reaches a terminal state."""
        stream = self._stub.WatchJob(
            pb.WatchJobRequest(job_id=job_id, after_seq=after_seq),
            timeout=WATCH_DEADLINE_S,
            metadata=self._metadata,
        )
        yield from stream

    def wait(self, job_id: str) -> pb.JobInfo:
        """Block until the job is over; returns its final record."""
        for _ in self.watch(job_id):
            pass
        return self.get(job_id)

    def download_model(self, job_id: str, dest: str | Path) -> pb.BlobRef:
        """Download the final model (safetensors) to ``dest``, verifying its hash."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        info = self.get(job_id)
        chunks = self._stub.DownloadModel(
            pb.JobRef(job_id=job_id), timeout=DOWNLOAD_DEADLINE_S, metadata=self._metadata
        )
        path, sha = receive_chunks(chunks, dest.parent)
        if info.model.sha256 and sha != info.model.sha256:
            path.unlink(missing_ok=True)
            raise TransferError("downloaded model is not the job's recorded model")
        os.replace(path, dest)
        return pb.BlobRef(sha256=sha, size=dest.stat().st_size)

    def download_valuation(self, job_id: str, dest: str | Path) -> Path:
        """Download a job's valuation file (operators; ``valuation.mode`` clear or secure)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        chunks = self._stub.GetValuation(
            pb.JobRef(job_id=job_id), timeout=DOWNLOAD_DEADLINE_S, metadata=self._metadata
        )
        path, _ = receive_chunks(chunks, dest.parent)
        os.replace(path, dest)
        return dest

    def dossier(self, job_id: str) -> dict[str, Any]:
        """A completed job's dossier (operators): what a product passport is built from."""
        response = self._call("GetDossier", pb.JobRef(job_id=job_id))
        value = json.loads(response.dossier_json)
        if not isinstance(value, dict):
            raise ValueError("the coordinator sent a malformed dossier")
        return value


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """One line for a user: status and the server's explanation."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            "cannot reach the coordinator (is it running, and are the address and "
            f"certificates right?): {details}"
        )
    return f"{code.name if code else 'error'}: {details}"
