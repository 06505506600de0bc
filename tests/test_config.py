"""Typed configs: YAML + overrides, unknown keys named, dump before work, CLI dry-run."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from synthaug.cli import main
from synthaug.config import ConfigError, dump_config, load_config, reference_markdown


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text(yaml.safe_dump({"sample": {"guidance_scale": 3.0, "steps": 10}, "sweep": {"ratios": [0, 2]}}))
    cfg = load_config(f, ["sample.guidance_scale=1.5", "classify.seeds=[4,5]"])
    assert cfg.sample.guidance_scale == 1.5 and cfg.sample.steps == 10
    assert cfg.sweep.ratios == (0, 2) and cfg.classify.seeds == (4, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sample.steps = 3  # frozen


@pytest.mark.parametrize("source,key", [
    ({"sample": {"guidence_scale": 2}}, "sample.guidence_scale"),
    ({"smaple": {}}, "smaple"),
])
def test_unknown_key_in_yaml_is_named(tmp_path, source, key):
    f = tmp_path / "x.yaml"
    f.write_text(yaml.safe_dump(source))
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(f)


def test_unknown_override_is_named_with_hint():
    with pytest.raises(ConfigError, match=r"'finetune.stpes'.*did you mean 'finetune.steps'"):
        load_config(None, ["finetune.stpes=3"])


@pytest.mark.parametrize("override,msg", [
    ("sample.sampler=euler", "unknown sampler"),
    ("sample.steps=0", "sample.steps"),
    ("sample.guidance_scale=-1", "sample.guidance_scale"),
    ("sample.per_class=0", "sample.per_class"),
    ("sweep.ratios=[-1]", "ratio -1 < 0"),
    ("sweep.ratios=[]", "empty grid"),
    ("sample.steps=abc", "cannot read"),
])
def test_bad_values_name_the_key(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["name=x", "sample.steps=7"])
    path = dump_config(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg


def test_reference_lists_every_section():
    ref = reference_markdown()
    for key in ("`ingest.k_per_class`", "`sample.guidance_scale`", "`sweep.ratios`", "`ray.num_cpus`"):
        assert key in ref


def test_cli_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    rc = main(["sample", "--dry-run", f"work_dir={tmp_path}/w", "sample.steps=5"])
    out = capsys.readouterr().out
    assert rc == 0 and "synthaug sample" in out and "steps=5" in out
    assert not (tmp_path / "w").exists()


def test_cli_overrides_may_follow_options(tmp_path, capsys):
    rc = main(["classify", "--dry-run", "--ratio", "2", "classify.epochs=3", f"work_dir={tmp_path}/w"])
    assert rc == 0 and "epochs=3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["classify", "--dry-run", "--ratio", "2", "--bogus"])


def test_cli_unknown_key_exits_2(capsys):
    assert main(["run", "--dry-run", "sampel.steps=3"]) == 2
    assert "unknown config key 'sampel'" in capsys.readouterr().err


def test_docs_config_reference_is_current():
    """docs/configuration.md's table is ``synthaug config-reference``; a new or changed key must show up there."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert reference_markdown().strip() in text, \
        "regenerate the table in docs/configuration.md with `synthaug config-reference`"


def test_config_reference_defaults_are_the_dataclasses_own():
    """Every row's default is the value a default ``Config()`` holds, read field by field from the
    dataclasses (not from the generator's own walk): e.g. ``finetune.steps`` is Config().finetune's."""
    import dataclasses as dc

    from synthaug.config import Config

    import re

    rows = {}
    for line in reference_markdown().splitlines():
        m = re.match(r"\| `([^`]+)` \| `(.*?)` \| ", line)
        if m:
            rows[m.group(1)] = m.group(2)
    cfg, seen = Config(), 0
    for top in dc.fields(Config):
        section = getattr(cfg, top.name)
        if dc.is_dataclass(section):
            for f in dc.fields(section):
                assert rows[f"{top.name}.{f.name}"] == repr(getattr(section, f.name)), f"{top.name}.{f.name}"
                seen += 1
        else:
            assert rows[top.name] == repr(section), top.name
            seen += 1
    assert seen == len(rows)
    assert rows["finetune.steps"] == repr(Config().finetune.steps) != repr(Config().pretrain.steps)
