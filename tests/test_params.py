"""Profiles load, and bad files fail with errors naming file, key and allowed values."""

from __future__ import annotations

import pytest
import yaml

from invariscope.config.params import PROFILES, ParamsError, digest, load_params, profile_path


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_load(profile):
    p = load_params(profile)
    assert p.profile == profile
    assert p.data.split.train + p.data.split.val + p.data.split.test == 50
    assert p.data.simulation.dose_fraction == pytest.approx(0.1)


def test_paper_profile_uses_paper_values():
    p = load_params("paper")
    assert p.data.source == "mayo"
    assert p.vae.crop_size == 128
    assert p.seed == 1332


def _write(tmp_path, mutate):
    raw = yaml.safe_load(profile_path("smoke").read_text())
    mutate(raw)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    f = _write(tmp_path, lambda r: r["data"]["simulation"].update(photons=3))
    with pytest.raises(ParamsError) as e:
        load_params(f)
    msg = str(e.value)
    assert str(f) in msg and "data.simulation.photons" in msg and "full_dose_photons" in msg


def test_bad_literal_lists_allowed_values(tmp_path):
    f = _write(tmp_path, lambda r: r["data"].update(source="tcia"))
    with pytest.raises(ParamsError, match=r"data\.source.*'simulated' or 'mayo'"):
        load_params(f)


def test_out_of_range_and_missing(tmp_path):
    def mutate(r):
        r["data"]["simulation"]["dose_fraction"] = 1.5
        del r["vae"]["crop_size"]

    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, mutate))
    msg = str(e.value)
    assert "data.simulation.dose_fraction" in msg and "less than or equal to 1" in msg
    assert "vae.crop_size: required key is missing" in msg


def test_slices_range_checked(tmp_path):
    f = _write(tmp_path, lambda r: r["data"]["simulation"].update(slices_per_patient=[5, 2]))
    with pytest.raises(ParamsError, match="slices_per_patient"):
        load_params(f)


def test_unknown_profile_lists_available():
    with pytest.raises(ParamsError, match="available profiles: .*default.*smoke"):
        load_params("no-such-profile")


def test_invalid_yaml(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("data: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(f)


def test_overrides_and_digest():
    a = load_params("smoke")
    b = load_params("smoke", {"data.simulation.dose_fraction": 0.25})
    assert b.data.simulation.dose_fraction == 0.25
    assert digest(a.data) != digest(b.data)
    assert digest(a.data) == digest(load_params("smoke").data)


@pytest.mark.parametrize("name", sorted(p.stem for p in profile_path("smoke").parent.glob("*.yaml")))
def test_every_params_file_loads(name):
    """Every file in params/ validates (variants such as default_global included)."""
    params = load_params(name)
    assert params.profile and params.source_file.endswith(f"{name}.yaml")


@pytest.mark.parametrize("path", sorted(str(p) for p in (profile_path("smoke").parent /
                                                         "experiments").glob("*.yaml")),
                         ids=lambda p: p.rsplit("/", 1)[-1])
def test_every_experiment_params_file_loads(path):
    """The experiments' params files (docs/) validate, each with a run folder of its own."""
    params = load_params(path)
    assert params.profile and params.profile not in ("smoke", "default", "paper")



@pytest.mark.parametrize("value", [True, "12", 12.5])
def test_numbers_are_not_coerced(value):
    """`iterations: true` or `"12"` is an error naming the key, not a silent 1 or 12."""
    with pytest.raises(ParamsError, match=r"denoisers\.cnn10\.iterations: Input should be a valid "
                       r"integer"):
        load_params("smoke", {"denoisers.cnn10.iterations": value})
    assert load_params("smoke", {"denoisers.cnn10.lr": 1}).denoisers.cnn10.lr == 1.0  # int for float
