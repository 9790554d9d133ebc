"""The job spec: what a model developer asks the federation to do.

A spec is written in TOML (or built with the SDK), validated strictly —
unknown fields and wrong types are errors that name the field — and reduced to
a canonical JSON form. The job's hash covers that canonical form, which
includes the SHA-256 of the task bundle if there is one, so a node can bind
its authorisation to exactly this job and nothing else.

The reference for every field is ``docs/job-spec.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_KINDS = ("logreg", "mlp", "cnn", "bundle")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
OPTIMIZERS = ("sgd", "adam")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PURPOSE_RE = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,63}$")
ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")


class SpecError(ValueError):
    """The job spec is malformed; the message names the field and what to fix."""


@dataclass(frozen=True)
class DataSection:
    """Which dataset (by registered name) and which of its feature columns."""

    dataset: str = ""
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSection:
    """The model: a built-in kind, or ``bundle`` for the developer's own code."""

    kind: str = "mlp"
    num_classes: int = 2
    hidden: tuple[int, ...] = (64, 32)
    input_shape: tuple[int, ...] = ()
    standardize: bool = True


@dataclass(frozen=True)
class TrainingSection:
    """Local training at each node, per round."""

    optimizer: str = "adam"
    lr: float = 0.01
    epochs: int = 1
    batch_size: int = 32
    seed: int = 0
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class FederationSection:
    """Rounds, participation, server strategy and secure aggregation."""

    rounds: int = 10
    min_nodes: int = 2
    max_nodes: int = 0
    strategy: str = "fedavg"
    server_lr: float = 1.0
    eta: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 0.001
    round_timeout_s: float = 120.0
    max_round_retries: int = 2
    wait_for_nodes_s: float = 300.0
    secure: bool = True


@dataclass(frozen=True)
class BundleSection:
    """The developer's task bundle: entry points inside the packed directory.

    ``path`` is only used client-side (to pack the directory); what the job
    binds to is ``sha256`` of the packed bundle.
    """

    path: str = ""
    model: str = ""
    train_step: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class ValuationSection:
    """How the job's data holders' contributions may be valued for a product.

    ``"none"``: no valuation material is kept. ``"clear"``: consented clear-text
    valuation — the coordinator keeps every node's per-round update so an exchange
    operator can compute exact (per-round) Shapley values; only for plaintext jobs,
    and every node sees this in the spec it grants, so granting is consenting.
    ``"secure"``: no update is ever seen; each round's masked vector also carries one
    DP-noised leave-one-out sum per roster node (all nodes but that one), revealed in
    the same unmasking as the training sum. Needs secure aggregation, participant-level
    DP and ``federation.max_nodes``: every node pays for ``max_nodes`` releases per
    round in its grant (see docs/contribution.md).
    """

    mode: str = "none"


VALUATION_MODES = ("none", "clear", "secure")


@dataclass(frozen=True)
class RecordLevelDP:
    """DP-SGD inside each node: per-sample clipping, Gaussian noise, Poisson sampling.

    Give ``epsilon`` (the node calibrates the noise to its own dataset size so the whole
    job spends exactly that) or ``noise_multiplier`` (the node reports the epsilon it
    yields); not both. ``clip`` is the per-sample gradient L2 bound.
    """

    epsilon: float = 0.0
    delta: float = 1e-5
    clip: float = 1.0
    noise_multiplier: float = 0.0


@dataclass(frozen=True)
class ParticipantLevelDP:
    """Distributed DP over whole participants: clipped updates plus Skellam noise shares.

    Each node clips its model update to L2 norm ``clip`` and adds its share of discrete
    noise before masking; shares are sized so the sum of any ``min_contributors`` nodes
    (0: ``federation.min_nodes``) already carries the full noise. Give ``epsilon`` or
    ``noise_multiplier`` (noise standard deviation of the sum / ``clip``), not both.
    """

    epsilon: float = 0.0
    delta: float = 1e-5
    clip: float = 1.0
    noise_multiplier: float = 0.0
    min_contributors: int = 0


@dataclass(frozen=True)
class PrivacySection:
    """Differential privacy of the job; either level, both, or neither."""

    record_level: RecordLevelDP | None = None
    participant_level: ParticipantLevelDP | None = None

    @property
    def enabled(self) -> bool:
        return self.record_level is not None or self.participant_level is not None


@dataclass(frozen=True)
class JobSpec:
    """A validated job spec."""

    name: str
    purpose: str
    data: DataSection
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    federation: FederationSection = field(default_factory=FederationSection)
    bundle: BundleSection = field(default_factory=BundleSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    valuation: ValuationSection = field(default_factory=ValuationSection)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples), without the client-only bundle path.

        ``privacy`` keeps only the levels the job uses and is left out entirely when it
        uses none, so jobs without DP keep the hash they had before DP existed.
        """
        out = asdict(self)
        out["bundle"].pop("path", None)
        privacy = {k: v for k, v in out.pop("privacy").items() if v is not None}
        if privacy:
            out["privacy"] = privacy
        if out["valuation"]["mode"] == "none":
            del out["valuation"]
        return _lists(out)

    def canonical_json(self) -> str:
        """The canonical JSON form that the job hash covers."""
        return json.dumps(
            self.to_dict(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )

    def job_hash(self) -> str:
        """SHA-256 over the canonical spec (which includes the bundle's hash)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def uses_bundle(self) -> bool:
        return self.model.kind == "bundle"


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


_SECTIONS: dict[str, type] = {
    "data": DataSection,
    "model": ModelSection,
    "training": TrainingSection,
    "federation": FederationSection,
    "bundle": BundleSection,
    "valuation": ValuationSection,
}
_PRIVACY_LEVELS: dict[str, type] = {
    "record_level": RecordLevelDP,
    "participant_level": ParticipantLevelDP,
}
_TOP_LEVEL = {"name", "purpose", "description", "privacy", *_SECTIONS}


def _coerce(where: str, annotation: str, value: Any) -> Any:
    """Check one field's type; ints are accepted where floats are expected."""
    if annotation == "str":
        if not isinstance(value, str):
            raise SpecError(f"{where} must be a string, got {type(value).__name__}")
        return value
    if annotation == "bool":
        if not isinstance(value, bool):
            raise SpecError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise SpecError(f"{where} must be finite, got {value!r}")
        return float(value)
    if annotation == "tuple[int, ...]":
        if not isinstance(value, list | tuple) or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value
        ):
            raise SpecError(f"{where} must be a list of integers, got {value!r}")
        return tuple(value)
    if annotation == "tuple[str, ...]":
        if not isinstance(value, list | tuple) or any(not isinstance(v, str) for v in value):
            raise SpecError(f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    raise AssertionError(annotation)


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise SpecError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SpecError(
            f"unknown field {name}.{unknown[0]}; valid fields of [{name}]: {', '.join(known)}"
        )
    values = {key: _coerce(f"{name}.{key}", str(known[key].type), val) for key, val in raw.items()}
    return cls(**values)


def _privacy(raw: Any) -> PrivacySection:
    if not isinstance(raw, Mapping):
        raise SpecError("[privacy] must be a table")
    unknown = sorted(set(raw) - set(_PRIVACY_LEVELS))
    if unknown:
        raise SpecError(
            f"unknown field privacy.{unknown[0]}; valid fields of [privacy]: "
            f"{', '.join(_PRIVACY_LEVELS)}"
        )
    levels = {
        key: _section(f"privacy.{key}", _PRIVACY_LEVELS[key], value)
        for key, value in raw.items()
        if value is not None
    }
    return PrivacySection(**levels)


def _validate_dp(where: str, level: RecordLevelDP | ParticipantLevelDP) -> None:
    if (level.epsilon > 0) == (level.noise_multiplier > 0):
        raise SpecError(
            f"{where} needs exactly one of epsilon (a target the noise is calibrated to) "
            "or noise_multiplier (the epsilon is reported); both must be > 0 when given"
        )
    if level.epsilon < 0 or level.noise_multiplier < 0:
        raise SpecError(f"{where}.epsilon and noise_multiplier must not be negative")
    if level.epsilon > 100:
        raise SpecError(f"{where}.epsilon must be at most 100 (larger is no guarantee at all)")
    if level.noise_multiplier > 1000:
        raise SpecError(f"{where}.noise_multiplier must be at most 1000")
    if not 0 < level.delta < 0.1:
        raise SpecError(f"{where}.delta must be in (0, 0.1); use 1/(10 x rows) or less")
    if not 0 < level.clip <= 1e6:
        raise SpecError(f"{where}.clip must be in (0, 1e6]")


def from_dict(raw: Mapping[str, Any]) -> JobSpec:
    """Validate a spec given as a mapping (parsed TOML or JSON)."""
    if not isinstance(raw, Mapping):
        raise SpecError("a job spec must be a table of fields")
    unknown = sorted(set(raw) - _TOP_LEVEL)
    if unknown:
        raise SpecError(
            f"unknown field {unknown[0]!r}; valid top-level fields: {', '.join(sorted(_TOP_LEVEL))}"
        )
    for key in ("name", "purpose", "data"):
        if key not in raw:
            raise SpecError(f"missing required field {key!r}")
    sections = {name: _section(name, cls, raw.get(name, {})) for name, cls in _SECTIONS.items()}
    sections["privacy"] = _privacy(raw.get("privacy", {}))
    spec = JobSpec(
        name=_coerce("name", "str", raw["name"]),
        purpose=_coerce("purpose", "str", raw["purpose"]),
        description=_coerce("description", "str", raw.get("description", "")),
        **sections,
    )
    validate(spec)
    return spec


def validate(spec: JobSpec) -> None:
    """Semantic checks beyond types."""
    if not NAME_RE.match(spec.name):
        raise SpecError("name must be 1-64 characters of letters, digits, '.', '_' or '-'")
    if not PURPOSE_RE.match(spec.purpose):
        raise SpecError(
            "purpose must be a lowercase purpose code such as 'medical-research' "
            "(letters, digits, '_', '.', ':', '-')"
        )
    if not spec.data.dataset or not NAME_RE.match(spec.data.dataset):
        raise SpecError("data.dataset must name a registered dataset")
    m = spec.model
    if m.kind not in MODEL_KINDS:
        raise SpecError(f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {m.kind!r}")
    if m.num_classes < 2:
        raise SpecError("model.num_classes must be at least 2")
    if any(h < 1 for h in m.hidden):
        raise SpecError("model.hidden sizes must be positive")
    if any(d < 1 for d in m.input_shape):
        raise SpecError("model.input_shape dimensions must be positive")
    if math.prod(m.input_shape or (1,)) > 1 << 24:
        raise SpecError("model.input_shape is too large (at most 16,777,216 values per sample)")
    if len(m.hidden) > 16 or any(h > 1 << 16 for h in m.hidden):
        raise SpecError("model.hidden allows at most 16 layers of at most 65,536 units")
    t = spec.training
    if t.optimizer not in OPTIMIZERS:
        raise SpecError(f"training.optimizer must be one of {', '.join(OPTIMIZERS)}")
    if not 0 < t.lr <= 10:
        raise SpecError("training.lr must be in (0, 10]")
    if not 1 <= t.epochs <= 1000:
        raise SpecError("training.epochs must be between 1 and 1000")
    if not 1 <= t.batch_size <= 1_000_000:
        raise SpecError("training.batch_size must be between 1 and 1000000")
    if t.proximal_mu < 0 or t.momentum < 0 or t.weight_decay < 0:
        raise SpecError("training.proximal_mu, momentum and weight_decay must be >= 0")
    f = spec.federation
    if f.strategy not in STRATEGIES:
        raise SpecError(f"federation.strategy must be one of {', '.join(STRATEGIES)}")
    if not 1 <= f.rounds <= 100_000:
        raise SpecError("federation.rounds must be between 1 and 100000")
    if f.min_nodes < 1:
        raise SpecError("federation.min_nodes must be at least 1")
    if f.max_nodes and f.max_nodes < f.min_nodes:
        raise SpecError("federation.max_nodes must be 0 (no limit) or >= min_nodes")
    if f.secure and f.min_nodes < 2:
        raise SpecError(
            "federation.min_nodes must be at least 2 with secure aggregation "
            "(a sum over one node reveals it); set secure = false to run with one node"
        )
    if f.round_timeout_s <= 0 or f.wait_for_nodes_s < 0 or f.max_round_retries < 0:
        raise SpecError("federation timeouts and retries must be positive")
    p = spec.privacy
    if p.enabled and m.kind == "bundle":
        raise SpecError(
            "[privacy] needs a built-in model: DP-SGD runs in Wharf's own trainer, and the "
            "participant-level noise is sized to the model before any code runs"
        )
    if p.enabled and m.standardize:
        raise SpecError(
            "[privacy] needs model.standardize = false: the statistics round that "
            "standardises features releases exact feature moments, outside any DP "
            "guarantee; scale the features before registering the data"
        )
    if p.record_level is not None:
        _validate_dp("privacy.record_level", p.record_level)
        if t.proximal_mu > 0:
            raise SpecError(
                "privacy.record_level cannot be combined with training.proximal_mu: "
                "FedProx's proximal term is not a per-example loss, so DP-SGD cannot clip it"
            )
    if p.participant_level is not None:
        pl = p.participant_level
        _validate_dp("privacy.participant_level", pl)
        if not f.secure:
            raise SpecError(
                "privacy.participant_level needs federation.secure = true (the noise is "
                "split between nodes and only their masked sum carries all of it)"
            )
        if pl.min_contributors < 0 or (pl.min_contributors and pl.min_contributors < 2):
            raise SpecError("privacy.participant_level.min_contributors must be 0 or >= 2")
        m_eff = pl.min_contributors or f.min_nodes
        if f.max_nodes and m_eff > f.max_nodes:
            raise SpecError(
                "privacy.participant_level.min_contributors (or federation.min_nodes) must "
                "not exceed federation.max_nodes"
            )
    if spec.valuation.mode not in VALUATION_MODES:
        raise SpecError(f"valuation.mode must be one of {', '.join(VALUATION_MODES)}")
    if spec.valuation.mode == "clear" and f.secure:
        raise SpecError(
            'valuation.mode = "clear" lets the coordinator keep every update in the clear; '
            "it needs federation.secure = false (and every node's consent, given by its grant)"
        )
    if spec.valuation.mode == "secure":
        if p.participant_level is None:
            raise SpecError(
                'valuation.mode = "secure" needs [privacy.participant_level]: its coalition '
                "sums are revealed with the participant-level noise and charged to it"
            )
        if not f.max_nodes:
            raise SpecError(
                'valuation.mode = "secure" needs federation.max_nodes: a round reveals one '
                "sum per roster node, and each node's grant pays for max_nodes releases"
            )
    b = spec.bundle
    if m.kind == "bundle":
        if not ENTRY_RE.match(b.model):
            raise SpecError("bundle.model must be an entry point like 'net:build_model'")
        if b.train_step and not ENTRY_RE.match(b.train_step):
            raise SpecError("bundle.train_step must be an entry point like 'net:train_step'")
    elif b.path or b.model or b.train_step or b.sha256:
        raise SpecError('a [bundle] section needs model.kind = "bundle"')


def load_toml(path: Path) -> JobSpec:
    """Read and validate a TOML spec; ``bundle.path`` is resolved relative to the file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path} is not valid TOML: {exc}") from None
    bundle = raw.get("bundle")
    if isinstance(bundle, dict) and isinstance(bundle.get("path"), str):
        bundle["path"] = str((path.parent / bundle["path"]).resolve())
    return from_dict(raw)


def from_json(text: str) -> JobSpec:
    """Parse the JSON form sent on the wire."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"spec is not valid JSON: {exc}") from None
    return from_dict(raw)


def with_bundle_hash(spec: JobSpec, sha256: str) -> JobSpec:
    """Bind the packed bundle's hash into the spec (and so into the job hash)."""
    from dataclasses import replace

    return replace(spec, bundle=replace(spec.bundle, sha256=sha256, path=""))
