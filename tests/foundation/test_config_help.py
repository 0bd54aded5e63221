"""Config mistakes are caught early and explained: the closest valid key, what a wrong path is,
cross-section settings refused before any data loads, and the thread setting."""

import pytest
import torch

from trustml import cli
from trustml import config as cfgmod
from trustml.config import ConfigError


@pytest.mark.parametrize("key, guess", [
    ("train.epoch", "train.epochs"),          # a sibling
    ("privacy.noise_multiplyer", "privacy.noise_multiplier"),
    ("run.epochs", "train.epochs"),           # the right name in the wrong section
    ("trian", "train"),                       # a section
])
def test_unknown_key_suggests_the_closest(key, guess):
    with pytest.raises(ConfigError, match=f"'{key}' is unknown; did you mean {guess}\\?$"):
        cfgmod.load(None, [f"{key}=1"])


def test_unknown_key_without_a_close_one_has_no_guess():
    with pytest.raises(ConfigError, match="'train.zzzzzz' is unknown$"):
        cfgmod.load(None, ["train.zzzzzz=1"])


def test_yaml_typo_suggests_the_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("fairness:\n  penaltey: mmd\n")
    assert cli.train_main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: config key 'fairness.penaltey' is unknown; did you mean fairness.penalty?")


def test_a_folder_as_config_is_named_a_directory(capsys):
    assert cli.train_main(["--config", "configs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file 'configs' is a directory; pick a file in it, e.g. ")
    assert "adult.yaml" in err


def test_fairness_with_privacy_is_refused_before_any_data_loads(monkeypatch, capsys):
    import trustml.data.tabular as tabular

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the config was validated")

    monkeypatch.setattr(tabular, "load_tabular", no_data)
    assert cli.train_main(["--config", "configs/adult_fair_mmd.yaml", "--set",
                           "privacy.enabled=true", "privacy.noise_multiplier=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fairness.penalty='mmd' with privacy.enabled=true" in err[0]
    assert "set fairness.penalty=none or privacy.enabled=false" in err[0]


def test_threads_default_config_and_environment(monkeypatch):
    monkeypatch.delenv("TRUSTML_THREADS", raising=False)
    assert cfgmod.threads(cfgmod.load(None)) == 1
    assert cfgmod.threads(cfgmod.load(None, ["run.threads=3"])) == 3
    monkeypatch.setenv("TRUSTML_THREADS", "2")
    assert cfgmod.threads(cfgmod.load(None, ["run.threads=3"])) == 2
    monkeypatch.setenv("TRUSTML_THREADS", "many")
    with pytest.raises(ConfigError, match="TRUSTML_THREADS: expected an integer >= 0"):
        cfgmod.threads(cfgmod.load(None))
    with pytest.raises(ConfigError, match="run.threads"):
        cfgmod.load(None, ["run.threads=-1"])


def test_use_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("TRUSTML_THREADS", "2")
    try:
        cfgmod.use_threads(cfgmod.load(None))
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("TRUSTML_THREADS", "0")  # torch's default: left alone
        cfgmod.use_threads(cfgmod.load(None))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
