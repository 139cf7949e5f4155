"""Config: layering, and errors that name the bad key."""

from __future__ import annotations

import datetime as dt

import pytest

from clvray.config import ConfigError, load_config


def test_defaults_yaml_and_overrides_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("features:\n  horizon_days: 60\ntrain:\n  max_depth: 3\n")
    cfg = load_config(path, ["features.horizon_days=30", "features.cutoff=2023-05-01"])
    assert cfg.features.horizon_days == 30
    assert cfg.features.cutoff == dt.date(2023, 5, 1)
    assert cfg.train.max_depth == 3
    assert cfg.train.eta == 0.05  # code default


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("features:\n  horizon_dayz: 60\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'features\.horizon_dayz'"):
        load_config(path)


def test_wrong_type_override_names_the_key():
    with pytest.raises(ConfigError, match=r"config key 'train\.max_depth'.*got 'deep'"):
        load_config(None, ["train.max_depth=deep"])


def test_rule_violation_names_the_key():
    with pytest.raises(ConfigError, match=r"'ingest\.max_reject_share'"):
        load_config(None, ["ingest.max_reject_share=2"])


def test_fingerprint_ignores_where_the_run_goes():
    a = load_config(None, ["run.storage=/tmp/a"])
    b = load_config(None, ["run.storage=s3://bucket/x"])
    c = load_config(None, ["features.horizon_days=30"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.data.source == "synthetic"
