import pytest

from trustml import cli
from trustml import config as cfgmod
from trustml.config import ConfigError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\nmodel:\n  hidden: [8, 4]\n")
    config = cfgmod.load(path, ["train.lr=0.01", "privacy.enabled=true",
                                "privacy.noise_multiplier=1.5", "model.hidden=[16]"])
    assert config.train.epochs == 7
    assert config.train.lr == 0.01
    assert config.model.hidden == [16]
    assert config.privacy.enabled and config.privacy.noise_multiplier == 1.5
    assert config.data.dataset == "adult"


def test_round_trip(tmp_path):
    config = cfgmod.load(None, ["run.name=x", "fairness.penalty=mmd"])
    cfgmod.save(config, tmp_path / "config.yaml")
    assert cfgmod.load(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("overrides, message", [
    (["train.epoch=3"], "config key 'train.epoch' is unknown"),
    (["train.epochs=abc"], "config key 'train.epochs'"),
    (["run.device=tpu"], "config key 'run.device'"),
    (["train.lr=-1"], "config key 'train.lr'"),
    (["privacy.enabled=true"], "exactly one of noise_multiplier and target_epsilon"),
    (["fairness.penalty=sinkhorn", "fairness.frequencies=64"], "'fairness'.*MMD setting"),
    (["fairness.penalty=mmd", "fairness.frequencies=0"], "config key 'fairness.frequencies'"),
    (["nonsense"], "expected key.path=value"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfgmod.load(None, overrides)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        cfgmod.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        cfgmod.load(bad)


def test_cli_reports_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    assert cli.train_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config key 'train.epoch' is unknown; did you mean train.epochs?"]


def test_cli_missing_data_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  path: {tmp_path}\n")
    assert cli.train_main(["--config", str(path)]) == 2
    assert "expected adult.data or adult.data.gz" in capsys.readouterr().err


def test_unknown_experiment(tmp_path, capsys):
    assert cli.train_main(["--config", "configs/adult.yaml", "--set", "run.experiment=magic"]) == 2
    assert "run.experiment" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["model.name=/nonexistent/gpt2"], "model.name '/nonexistent/gpt2': could not load"),
    (["data.tokenizer=/nonexistent/tok"], "data.tokenizer '/nonexistent/tok': could not load"),
    (["data.dataset=text", "data.text_path=/nonexistent.txt"], "does not exist"),
])
def test_language_inputs_fail_with_one_line(overrides, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.train_main(["--config", "configs/gpt2_dp.yaml", "--set", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
