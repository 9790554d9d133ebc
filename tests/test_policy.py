"""The node's policy: parsing strictly, and every refusal reason, approval path and bundle rule."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Pki

from wharf.node.datasets import schema_hash
from wharf.node.policy import Policy, PolicyError, evaluate, load_policy, parse_policy
from wharf.records import Grant, RegistrationCertificate
from wharf.spec import JobSpec, from_dict

BUNDLE = "12" * 32
SCHEMA = (
    ("age", "int64"),
    ("bmi", "float64"),
    ("genome", "float64"),
    ("ssn", "int64"),
    ("y", "int64"),
)

POLICY = """
allowed_purposes = ["medical-research", "public-health"]
grant_ttl_hours = 48

[levels.general]
secure_aggregation = true
[levels.important]
secure_aggregation = true
dp_required = true
max_epsilon = 8.0
[levels.core]
usable = false

[quotas]
max_rounds = 100
max_epochs = 5
max_samples = 1000000

[[auto_approve]]
requester = "alice"
purpose = "medical-research"
max_level = "general"
bundle_sha256 = []

[[auto_approve]]
requester = ["bob"]
max_level = "important"
bundle_sha256 = ["BUNDLE"]
""".replace("BUNDLE", BUNDLE)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = tmp_path_factory.mktemp("policy") / "policy.toml"
    path.write_text(POLICY, encoding="utf-8")
    return load_policy(path)


def registration(**kw: Any) -> RegistrationCertificate:
    fields: dict[str, Any] = {
        "node": "hospital-a",
        "dataset": "cancer",
        "fingerprint": "ab" * 32,
        "schema": SCHEMA,
        "schema_hash": schema_hash(SCHEMA),
        "row_count": 500,
        "label": "y",
        "features": ("age", "bmi", "genome", "ssn"),
        "classification": "general",
        "column_levels": (("bmi", "important"), ("genome", "core")),
        "allowed_purposes": ("medical-research",),
        "prohibited_columns": ("ssn",),
    }
    fields.update(kw)
    return RegistrationCertificate(**fields)


def job(**sections: Any) -> JobSpec:
    raw: dict[str, Any] = {
        "name": "probe",
        "purpose": "medical-research",
        "data": {"dataset": "cancer", "features": ["age"]},
        "federation": {"rounds": 10, "min_nodes": 2, "secure": True},
        "training": {"epochs": 2},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return from_dict(raw)


def bundle_job(sha: str = BUNDLE, **sections: Any) -> JobSpec:
    return job(model={"kind": "bundle"}, bundle={"model": "net:build", "sha256": sha}, **sections)


# --------------------------------------------------------------------------- refusals


def refusal(decision: Any) -> str:
    assert decision.outcome == "refuse", decision
    return "\n".join(decision.reasons)


def test_purpose_not_allowed_by_policy_or_dataset(policy: Policy) -> None:
    why = refusal(evaluate(policy, registration(), job(purpose="marketing"), "alice"))
    assert "purpose 'marketing' is not allowed by this node's policy" in why
    assert "not allowed for dataset 'cancer' (medical-research)" in why
    why = refusal(evaluate(policy, registration(), job(purpose="public-health"), "alice"))
    assert "not allowed by this node's policy" not in why
    assert "purpose 'public-health' is not allowed for dataset 'cancer'" in why


def test_prohibited_column_explicit_and_implicit(policy: Policy) -> None:
    why = refusal(evaluate(policy, registration(), job(data={"features": ["age", "ssn"]}), "alice"))
    assert "column 'ssn' prohibited (negative list)" in why
    # No explicit features: the job uses every registered feature, ssn included.
    why = refusal(evaluate(policy, registration(), job(data={"features": []}), "alice"))
    assert "'ssn' prohibited" in why and "uses them all" in why
    # The node-wide negative list applies to every dataset.
    node_wide = parse_policy({**_raw(), "prohibited_columns": ["age"]})
    assert "column 'age' prohibited" in refusal(evaluate(node_wide, registration(), job(), "alice"))


def test_unknown_column_and_wrong_dataset(policy: Policy) -> None:
    why = refusal(evaluate(policy, registration(), job(data={"features": ["height"]}), "alice"))
    assert "column 'height' not in dataset 'cancer'" in why
    why = refusal(evaluate(policy, registration(dataset="other"), job(), "alice"))
    assert "asks for dataset 'cancer', not 'other'" in why


def test_levels_require_protections(policy: Policy) -> None:
    important = job(data={"features": ["age", "bmi"]})
    why = refusal(evaluate(policy, registration(), important, "alice"))
    assert "column 'bmi' (level 'important') require differential privacy" in why
    assert evaluate(policy, registration(), important, "bob", dp=(4.0, 1e-6)).outcome != "refuse"
    why = refusal(evaluate(policy, registration(), important, "bob", dp=(9.5, 1e-6)))
    assert "allow epsilon <= 8; the job asks 9.5" in why
    why = refusal(evaluate(policy, registration(), job(data={"features": ["genome"]}), "alice"))
    assert "column 'genome' (level 'core'): this node never lets a job use 'core' data" in why
    plain = job(federation={"secure": False, "min_nodes": 1})
    why = refusal(evaluate(policy, registration(), plain, "alice"))
    assert "require secure aggregation; set federation.secure = true" in why
    # The dataset's level is a floor for every column, the label included.
    why = refusal(evaluate(policy, registration(classification="important"), job(), "alice"))
    assert "columns 'age', 'y' (level 'important') require differential privacy" in why


def test_quotas(policy: Policy) -> None:
    greedy = job(federation={"rounds": 101}, training={"epochs": 6})
    why = refusal(evaluate(policy, registration(), greedy, "alice"))
    assert "federation.rounds = 101 exceeds this node's quota of 100" in why
    assert "training.epochs = 6 exceeds this node's quota of 5 per round" in why
    big = registration(row_count=60_000)
    why = refusal(evaluate(policy, big, job(), "alice"))
    assert "would use 1200000 samples (60000 rows x 2 epochs x 10 rounds)" in why


def test_all_reasons_are_collected(policy: Policy) -> None:
    bad = job(purpose="marketing", data={"features": ["ssn", "genome"]}, federation={"rounds": 500})
    decision = evaluate(policy, registration(), bad, "alice")
    assert decision.outcome == "refuse" and len(decision.reasons) >= 5


def test_default_policy_refuses_everything() -> None:
    why = refusal(evaluate(Policy(), registration(), job(), "alice"))
    assert "not allowed by this node's policy (none)" in why


# --------------------------------------------------------------------------- approvals


def test_auto_approval_and_grant(policy: Policy, pki: Pki) -> None:
    decision = evaluate(policy, registration(), job(), "alice")
    assert decision.outcome == "auto_approve" and decision.rule == 0
    assert decision.columns == ("age", "y") and decision.level == "general"
    assert (decision.quotas.rounds, decision.quotas.epochs, decision.quotas.samples) == (
        10,
        2,
        10_000,
    )
    now = time.time()
    g = decision.grant(node="hospital-a", job_id="job-1", ttl_hours=policy.grant_ttl_hours, now=now)
    assert g.expires_at == now + 48 * 3600 and g.job_hash == job().job_hash()
    signed = g.sign(pki["hospital-a"].signer())
    verified = Grant.verified(signed, pki.coordinator.ca_pem, now=now + 60)
    assert verified.requester == "alice" and verified.columns == ("age", "y")
    assert verified.check("job-1", job().job_hash(), now + 60) == []
    changed = job(training={"epochs": 3})
    assert "job hash changed" in verified.check("job-1", changed.job_hash(), now + 60)[0]


def test_pending_when_no_rule_matches(policy: Policy) -> None:
    decision = evaluate(policy, registration(), job(), "carol")
    assert decision.outcome == "pending"
    text = "\n".join(decision.reasons)
    assert "the node's operator must decide" in text
    assert "auto_approve[0]: requester 'carol' is not 'alice'" in text
    # Alice's rule stops at 'general'; important data with DP waits for the operator.
    important = job(data={"features": ["age", "bmi"]})
    decision = evaluate(policy, registration(), important, "alice", dp=(1.0, 1e-6))
    assert decision.outcome == "pending" and decision.level == "important"
    assert "touches 'important' data, above 'general'" in "\n".join(decision.reasons)


def test_bundle_jobs_need_a_listed_hash(policy: Policy) -> None:
    # Alice's rule lists no bundle: her bundle job waits for the operator.
    decision = evaluate(policy, registration(), bundle_job(), "alice")
    assert decision.outcome == "pending"
    assert f"carries a code bundle ({BUNDLE})" in decision.reasons[0]
    # Bob's rule lists exactly this hash.
    decision = evaluate(policy, registration(), bundle_job(), "bob")
    assert decision.outcome == "auto_approve" and decision.rule == 1
    assert decision.bundle_sha256 == BUNDLE
    other = evaluate(policy, registration(), bundle_job("34" * 32), "bob")
    assert other.outcome == "pending"
    assert "code bundle 343434343434… is not listed" in "\n".join(other.reasons)


def test_refused_decision_cannot_become_a_grant(policy: Policy) -> None:
    decision = evaluate(policy, registration(), job(purpose="marketing"), "alice")
    with pytest.raises(PolicyError, match="cannot be granted"):
        decision.grant(node="hospital-a", job_id="j", ttl_hours=1)


# --------------------------------------------------------------------------- parsing


def _raw() -> dict[str, Any]:
    import tomllib

    return tomllib.loads(POLICY)


def test_level_defaults_are_kept_unless_overridden() -> None:
    p = parse_policy({"allowed_purposes": ["x"], "levels": {"important": {"max_epsilon": 2}}})
    assert p.rule("important").dp_required and p.rule("important").max_epsilon == 2.0
    assert p.rule("general").secure_aggregation and not p.rule("core").usable
    relaxed = parse_policy({"levels": {"important": {"dp_required": False}}})
    assert not relaxed.rule("important").dp_required


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alowed_purposes = []", "unknown field alowed_purposes"),
        ("[levels.secret]\nusable = true", "unknown field levels.secret"),
        ("[levels.general]\nsecure = true", "unknown field levels.general.secure"),
        ("[levels.core]\nusable = true", "levels.core.usable cannot be true"),
        ("[levels.important]\nmax_epsilon = -1", "levels.important.max_epsilon must be a number"),
        (
            "[levels.general]\ndp_required = 'yes'",
            "levels.general.dp_required must be true or false",
        ),
        ("[quotas]\nmax_rounds = 0", "quotas.max_rounds must be a whole number >= 1"),
        ("[quotas]\nmax_round = 3", "unknown field quotas.max_round"),
        ("allowed_purposes = ['Medical Research']", "is not a purpose code"),
        ("allowed_purposes = 'x'\nlevels = 3", "levels must be a table"),
        ("[[auto_approve]]\nbundle_sha256 = []", "auto_approve[0] has no conditions"),
        ("[[auto_approve]]\nrequester = 'a'\nmax_level = 'top'", "auto_approve[0].max_level"),
        ("[[auto_approve]]\nrequester = 'a'\nbundle_sha256 = ['ABC']", "not a lowercase sha256"),
        ("[[auto_approve]]\nrequester = 'a'\nowner = 'b'", "unknown field auto_approve[0].owner"),
        ("auto_approve = 'a'", "auto_approve must be an array of tables"),
        ("grant_ttl_hours = 0", "grant_ttl_hours must be a number > 0"),
        ("allowed_purposes = [", "is not valid TOML"),
    ],
)
def test_malformed_policy_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(PolicyError, match=None) as info:
        load_policy(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(tmp_path / "nope.toml")
