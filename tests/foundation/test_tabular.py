import gzip
import shutil

import numpy as np
import pytest
import torch

from trustml.config import ConfigError, DataConfig
from trustml.data.sampling import ShuffledBatches
from trustml.data.tabular import FILES, load_tabular


@pytest.fixture(scope="module")
def adult():
    return load_tabular(DataConfig(), seed=0)


def test_adult_splits_and_shapes(adult):
    assert len(adult.train) + len(adult.val) == 32561
    assert len(adult.test) == 16281
    assert adult.train.x.shape == (len(adult.train), adult.n_features)
    assert adult.n_features == len(adult.feature_names)
    assert adult.group_names == ["Female", "Male"]
    item = adult.train[0]
    assert set(item) == {"x", "y", "s"} and item["x"].dtype == torch.float32
    # test labels carry a trailing '.', which must not turn every test label negative
    assert 0.2 < adult.test.y.float().mean() < 0.3
    assert 0.2 < adult.train.y.float().mean() < 0.3
    # one-hot: each categorical block of a row sums to one
    blocks = [i for i, n in enumerate(adult.feature_names) if n.startswith("sex=")]
    assert torch.allclose(adult.test.x[:, blocks].sum(1), torch.ones(len(adult.test)))


def test_standardisation_fitted_on_train_only(adult):
    age = adult.feature_names.index("age")
    both = torch.cat([adult.train.x[:, age], adult.val.x[:, age]])
    assert abs(both.mean()) < 1e-4 and abs(both.std() - 1) < 1e-3
    assert abs(adult.test.x[:, age].mean()) > 1e-4  # test rows are transformed, not refitted


def test_race_and_german():
    race = load_tabular(DataConfig(sensitive="race"))
    assert len(race.group_names) == 5 and race.train.s.max() == 4
    german = load_tabular(DataConfig(dataset="german", target="credit", val_fraction=0.1))
    assert len(german.train) + len(german.val) + len(german.test) == 1000
    assert german.group_names == ["female", "male"]


def test_user_path_and_bad_rows(tmp_path):
    shutil.copy(FILES / "german.data.gz", tmp_path / "german.data.gz")
    data = load_tabular(DataConfig(dataset="german", path=str(tmp_path)))
    assert len(data.test) == 300
    with gzip.open(tmp_path / "german.data.gz", "wt") as handle:
        handle.write("A11 6 A34\n")
    with pytest.raises(ConfigError, match="line 1: expected 21 fields"):
        load_tabular(DataConfig(dataset="german", path=str(tmp_path)))


def test_bad_choices():
    with pytest.raises(ConfigError, match="data.sensitive"):
        load_tabular(DataConfig(sensitive="religion"))
    with pytest.raises(ConfigError, match="data.target"):
        load_tabular(DataConfig(target="wealth"))


def test_shuffled_batches_deterministic_per_epoch(adult):
    sub = adult.train.subset(np.arange(100))
    batches = ShuffledBatches(sub, 32, seed=3)
    first = [b["y"] for b in batches.batches(0)]
    assert len(first) == len(batches) == 4
    assert sum(len(b) for b in first) == 100
    again = [b["y"] for b in batches.batches(0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = torch.cat([b["x"][:, 0] for b in batches.batches(1)])
    assert not torch.equal(torch.cat([b["x"][:, 0] for b in batches.batches(0)]), other)


def test_hub_route_maps_columns(monkeypatch):
    """The hf: route (network in real use) maps a hub copy's column names onto UCI Adult's."""
    import datasets

    from trustml.data.tabular import ADULT_COLUMNS, _open

    rows = _open(FILES / "adult.data.gz").rows[:400]
    hub_names = [c.replace("-", ".") for c in ADULT_COLUMNS]  # e.g. 'education.num'
    table = datasets.Dataset.from_dict({n: [r[i] for r in rows] for i, n in enumerate(hub_names)})
    calls = []

    def fake_load(name, revision=None):
        calls.append(name)
        return datasets.DatasetDict({"train": table})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_tabular(DataConfig(path="hf:scikit-learn/adult-census-income", val_fraction=0.0))
    assert calls == ["scikit-learn/adult-census-income"]
    assert len(data.train) + len(data.test) == 400  # no test split on the hub: 30% held out
