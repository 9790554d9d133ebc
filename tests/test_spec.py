"""Job spec parsing: strict, clear errors, canonical hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from wharf import spec as spec_mod
from wharf.spec import SpecError

BASE = """
name = "bc"
purpose = "medical-research"
[data]
dataset = "breast_cancer"
[model]
kind = "mlp"
hidden = [8]
[federation]
rounds = 3
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_defaults_secure_on_and_hash_stable(tmp_path: Path) -> None:
    s = spec_mod.load_toml(write(tmp_path, BASE))
    assert s.federation.secure is True
    assert s.federation.rounds == 3 and s.model.hidden == (8,)
    again = spec_mod.from_json(s.canonical_json())
    assert again == s and again.job_hash() == s.job_hash()
    other = spec_mod.load_toml(write(tmp_path, BASE.replace("rounds = 3", "rounds = 4")))
    assert other.job_hash() != s.job_hash()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: "bogus = 1\n" + t, "unknown field 'bogus'"),
        (
            lambda t: t.replace("rounds = 3", "rounds = 3\nround = 2"),
            "unknown field federation.round",
        ),
        (lambda t: t.replace("rounds = 3", 'rounds = "3"'), "federation.rounds must be an integer"),
        (lambda t: t.replace("rounds = 3", "rounds = 0"), "federation.rounds"),
        (lambda t: t.replace('kind = "mlp"', 'kind = "transformer"'), "model.kind must be one of"),
        (lambda t: t.replace('purpose = "medical-research"', 'purpose = "Any Thing"'), "purpose"),
        (lambda t: t.replace('dataset = "breast_cancer"', 'dataset = ""'), "data.dataset"),
        (lambda t: t.replace("rounds = 3", "rounds = 3\nmin_nodes = 1"), "at least 2 with secure"),
        (lambda t: t + "\n[training]\nlr = nan\n", "training.lr must be finite"),
        (lambda t: t + '\n[bundle]\nmodel = "x:y"\n', "needs model.kind"),
        (lambda t: t.replace("[data]", "[data]\nfeatures = 3"), "data.features must be a list"),
        (lambda t: t.replace("name = ", "nam = "), "unknown field 'nam'"),
        (lambda t: "name = [", "not valid TOML"),
    ],
)
def test_malformed_specs_name_the_field(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        spec_mod.load_toml(write(tmp_path, edit(BASE)))


def test_missing_file_and_bad_json() -> None:
    with pytest.raises(SpecError, match="not found"):
        spec_mod.load_toml(Path("/nonexistent/job.toml"))
    with pytest.raises(SpecError, match="not valid JSON"):
        spec_mod.from_json("{")


def test_plaintext_needs_explicit_flag_and_allows_one_node(tmp_path: Path) -> None:
    text = BASE.replace("rounds = 3", "rounds = 3\nmin_nodes = 1\nsecure = false")
    s = spec_mod.load_toml(write(tmp_path, text))
    assert s.federation.secure is False and s.federation.min_nodes == 1


def test_bundle_hash_binds_into_job_hash(tmp_path: Path) -> None:
    text = BASE.replace('kind = "mlp"', 'kind = "bundle"\ninput_shape = [30]') + (
        '\n[bundle]\npath = "b"\nmodel = "net:build_model"\n'
    )
    s = spec_mod.load_toml(write(tmp_path, text))
    assert s.bundle.path == str((tmp_path / "b").resolve())
    a = spec_mod.with_bundle_hash(s, "a" * 64)
    b = spec_mod.with_bundle_hash(s, "b" * 64)
    assert a.job_hash() != b.job_hash()
    assert "path" not in a.to_dict()["bundle"]


DP_BASE = BASE.replace('kind = "mlp"', 'kind = "mlp"\nstandardize = false')


def test_privacy_section_parses_and_binds_into_the_hash(tmp_path: Path) -> None:
    plain = spec_mod.load_toml(write(tmp_path, DP_BASE))
    assert not plain.privacy.enabled and "privacy" not in plain.to_dict()
    text = DP_BASE + (
        "\n[privacy.record_level]\nepsilon = 4\nclip = 1.5\n"
        "\n[privacy.participant_level]\nnoise_multiplier = 0.8\nmin_contributors = 2\n"
    )
    s = spec_mod.load_toml(write(tmp_path, text))
    r, p = s.privacy.record_level, s.privacy.participant_level
    assert r is not None and (r.epsilon, r.delta, r.clip, r.noise_multiplier) == (4, 1e-5, 1.5, 0)
    assert p is not None and p.noise_multiplier == 0.8 and p.min_contributors == 2
    assert spec_mod.from_json(s.canonical_json()) == s
    assert s.job_hash() != plain.job_hash()
    looser = spec_mod.load_toml(write(tmp_path, text.replace("epsilon = 4", "epsilon = 8")))
    assert looser.job_hash() != s.job_hash()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("\n[privacy.record_level]\n", "exactly one of epsilon"),
        ("\n[privacy.record_level]\nepsilon = 1\nnoise_multiplier = 1\n", "exactly one of"),
        ("\n[privacy.record_level]\nepsilon = -1\n", "exactly one of"),
        ("\n[privacy.record_level]\nepsilon = 1\ndelta = 0.5\n", "delta must be in"),
        ("\n[privacy.record_level]\nepsilon = 1\nclip = 0\n", "clip must be in"),
        ("\n[privacy.record_level]\nepsilon = 1000\n", "at most 100"),
        (
            "\n[privacy.record_level]\nepsilon = 1\nsigma = 2\n",
            "unknown field privacy.record_level",
        ),
        ("\n[privacy.item_level]\nepsilon = 1\n", "unknown field privacy.item_level"),
        (
            "\n[training]\nproximal_mu = 0.1\n[privacy.record_level]\nepsilon = 1\n",
            "proximal_mu",
        ),
        ("\n[privacy.participant_level]\nepsilon = 1\nmin_contributors = 1\n", "0 or >= 2"),
    ],
)
def test_malformed_privacy_sections_name_the_field(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        spec_mod.load_toml(write(tmp_path, DP_BASE + extra))


def test_privacy_needs_no_standardisation_a_builtin_model_and_secure_participants(
    tmp_path: Path,
) -> None:
    dp = "\n[privacy.participant_level]\nepsilon = 2\n"
    with pytest.raises(SpecError, match=r"model\.standardize = false"):
        spec_mod.load_toml(write(tmp_path, BASE + dp))
    plaintext = DP_BASE.replace("rounds = 3", "rounds = 3\nsecure = false")
    with pytest.raises(SpecError, match=r"needs federation\.secure = true"):
        spec_mod.load_toml(write(tmp_path, plaintext + dp))
    capped = DP_BASE.replace("rounds = 3", "rounds = 3\nmin_nodes = 4\nmax_nodes = 5")
    with pytest.raises(SpecError, match=r"must not exceed federation\.max_nodes"):
        spec_mod.load_toml(write(tmp_path, capped + dp.replace("2\n", "2\nmin_contributors = 6\n")))
    # Record-level DP works in plaintext mode too (it holds whatever the coordinator does).
    ok = spec_mod.load_toml(write(tmp_path, plaintext + "\n[privacy.record_level]\nepsilon = 2\n"))
    assert ok.privacy.record_level is not None
