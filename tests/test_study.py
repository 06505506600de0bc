"""``synthaug study``: paired statistics on known tables, and one tiny (k, draw) run end to end (real Ray)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from synthaug import study as S
from synthaug.cli import main
from synthaug.config import ConfigError, absolute_locations, load_config


def _table(gains: dict[str, list[float]], draws=(0, 1), seeds=(0, 1, 2), k=10) -> pd.DataFrame:
    """Real only at 90 + draw + seed/10; each arm at real + its gain for that (draw, seed)."""
    rows = []
    for d in draws:
        for i, s in enumerate(seeds):
            real = 90 + d + s / 10
            rows.append({"k": k, "draw": d, "seed": s, "arm": S.REAL, "top1": real})
            for arm, g in gains.items():
                rows.append({"k": k, "draw": d, "seed": s, "arm": arm, "top1": real + g[d * len(seeds) + i]})
    return pd.DataFrame(rows)


def test_paired_differences_pool_draws_and_seeds():
    syn = [1.0, 2.0, 3.0, 1.5, 2.5, 2.0]
    pl = [3.0, 3.0, 3.0, 3.0, 3.0, 3.1]
    summary = S.summarize(_table({"real + syn (w=1)": syn, S.PSEUDO: pl}))
    r = summary[10]["real + syn (w=1)"]
    d = np.array(syn)
    assert r["n"] == 6 and r["draws"] == [0, 1]
    assert math.isclose(r["vs_real"]["mean"], d.mean()) and math.isclose(r["vs_real"]["std"], d.std(ddof=1))
    half = stats.t.ppf(0.975, 5) * d.std(ddof=1) / math.sqrt(6)
    assert np.allclose(r["vs_real"]["ci95"], [d.mean() - half, d.mean() + half])
    assert r["beats_real_2sd"] is True  # mean 2.0 > 2 x 0.71
    vp = np.array(syn) - np.array(pl)
    assert math.isclose(r["vs_pseudo"]["mean"], vp.mean())
    assert r["beats_or_matches_pseudo"] is False  # about -1.0, interval below 0
    assert S.goal_met(summary) == []
    assert list(summary[10]) == [S.REAL, S.PSEUDO, "real + syn (w=1)"]  # real, pseudo, then synthetic arms


def test_goal_needs_both_conditions():
    noisy = [3.0, -2.0, 4.0, -1.0, 2.0, 0.5]  # positive mean, within noise
    clean = [2.0, 2.1, 1.9, 2.0, 2.2, 1.8]
    summary = S.summarize(_table({"a + syn": noisy, "b + syn": clean, S.PSEUDO: [2.0] * 6}))
    assert summary[10]["a + syn"]["beats_real_2sd"] is False
    assert summary[10]["b + syn"]["beats_real_2sd"] is True
    assert summary[10]["b + syn"]["beats_or_matches_pseudo"] is True  # matches: the interval holds 0
    assert S.goal_met(summary) == [(10, "b + syn")]
    md = S.markdown(summary, load_config(None, []), {"r": {"x": 60.0}}, "synthaug study")
    assert "**Goal met by:** k=10: b + syn" in md and "| b + syn | " in md


def test_pairs_only_common_draw_seed():
    t = _table({"x + syn": [1.0] * 6})
    t = t[~((t.arm == "x + syn") & (t.draw == 1) & (t.seed == 2))]
    r = S.summarize(t)[10]["x + syn"]
    assert r["n"] == 5 and r["vs_real"]["n"] == 5


def test_each_arm_at_its_best_budget_on_val_reported_on_test():
    """Budgets are chosen on val per arm; the figures and gains come from test; equal-budget tables on request."""
    rows = []
    for d in (0, 1):
        for s in (0, 1, 2):
            for b, real_val, syn_val in ((100, 80.0, 70.0), (400, 75.0, 90.0)):  # real best at 100, syn at 400
                real_test, syn_test = 60.0 + s + b / 100, 63.0 + s + b / 100 + d / 10
                rows += [{"k": 10, "draw": d, "seed": s, "arm": S.REAL, "budget": b, "top1": real_val, "test_top1": real_test},
                         {"k": 10, "draw": d, "seed": s, "arm": "x + syn", "budget": b, "top1": syn_val, "test_top1": syn_test}]
    t = pd.DataFrame(rows)
    arms = S.summarize(t)[10]
    assert arms[S.REAL]["budget"] == 100 and arms["x + syn"]["budget"] == 400
    assert arms[S.REAL]["split"] == "test" and arms[S.REAL]["top1_mean"] == pytest.approx(62.0)
    assert arms["x + syn"]["vs_real"]["mean"] == pytest.approx(3.0 + 3.0 + 0.05)  # syn at 400 vs real at 100, on test
    assert arms["x + syn"]["val_top1_mean"] == 90.0
    equal = S.summarize(t, by_budget=True)[10]
    assert set(equal) == {100, 400} and equal[400]["x + syn"]["vs_real"]["mean"] == pytest.approx(3.05)
    assert S.summarize(t.drop(columns="test_top1"))[10][S.REAL]["split"] == "val"


def test_study_config_is_checked():
    with pytest.raises(ConfigError, match="study.headline_k"):
        load_config(None, ["study.k_per_class=[5, 30]", "study.headline_k=10"])
    with pytest.raises(ConfigError, match="study.draws"):
        load_config(None, ["study.draws=[0, 0]"])
    with pytest.raises(ConfigError, match=r"study.recipes.ts': unknown classify key\(s\) \['added_batches'\]"):
        load_config(None, ["study.recipes={ts: {added_batches: 8}}"])
    with pytest.raises(ConfigError, match="study.budgets"):
        load_config(None, ["study.budgets=[0]"])
    with pytest.raises(ConfigError, match=r"study.dpt_tau' must be null or a number in \[0, 1\)"):
        load_config(None, ["study.dpt_tau=1.0"])
    cfg = load_config("jobs/configs/study.yaml")
    assert list(cfg.study.k_per_class) == [5, 10, 30] and len(cfg.study.draws) >= 2 and len(cfg.classify.seeds) >= 5
    rc = S.run_config(cfg, 30, 1)
    assert (rc.name, rc.ingest.k_per_class, rc.ingest.seed) == ("study-k30-d1", 30, 1)


def test_study_end_to_end_tiny(ray_session, tmp_path, capsys):
    """One (k, draw) run of the tiny config through the CLI: every arm per seed, and the tables."""
    over = [f"work_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}", "name=st",
            "study.k_per_class=[4]", "study.draws=[1]", "study.headline_k=4", "classify.seeds=[0, 1]",
            "classify.epochs=2", "sample.per_class=4", "sample.guidance_scale=1.0", "sweep.guidance_scales=[1.0]",
            "sweep.ratios=[0, 1]", "sweep.taus=[0.01]", "filter.tau=0.01", "pseudolabel.with_synthetic=true",
            "pseudolabel.threshold=0.0", "pretrain.steps=4", "finetune.steps=4", "ingest.test_fraction=0.2",
            "study.recipes={kd: {added_batch: 8, added_weight: 0.5, kd_teacher: teacher}}", "study.dpt=true",
            "study.dpt_tau=0"]
    assert main(["study", "--config", "jobs/configs/tiny.yaml", *over]) == 0
    out = tmp_path / "results" / "st"
    table = pd.read_csv(out / "study.csv")
    assert set(table.k) == {4} and set(table.draw) == {1}
    arms = {S.REAL, S.PSEUDO, "real + syn (w=1 tau=0.01)", "pseudo-label + syn (w=1 tau=0.01)"}
    arms |= {"real + syn-DPT (w=1)"}  # a generator fine-tuned on + pseudo-labels, unfiltered (study.dpt_tau)
    arms |= {f"{a} [kd]" for a in arms - {S.REAL}}  # the recipe's arms; real only once
    assert set(table.arm) == arms and table.test_top1.between(0, 100).all()
    assert all(sorted(g.seed) == [0, 1] for _, g in table.groupby("arm"))
    assert table.top1.between(0, 100).all()
    js = json.loads((out / "study.json").read_text())
    assert js["k_per_class"] == [4] and js["seeds"] == [0, 1]
    assert js["report_split"] == "test"
    real, syn = (table[table.arm == a].set_index("seed").test_top1 for a in (S.REAL, "real + syn (w=1 tau=0.01)"))
    assert math.isclose(js["summary"]["4"]["real + syn (w=1 tau=0.01)"]["vs_real"]["mean"], float((syn - real).mean()))
    assert "## k = 4 labelled images per class" in (out / "study.md").read_text()
    assert (out / "config.yaml").exists() and not (out / "config.attempt.yaml").exists()
    assert (tmp_path / "runs" / "st-k4-d1" / "data" / "train").exists()
    dpt = json.loads((tmp_path / "runs" / "st-k4-d1" / "generators" / "finetune-dpt" / "manifest.json").read_text())
    plain = json.loads((tmp_path / "runs" / "st-k4-d1" / "generators" / "finetune" / "manifest.json").read_text())
    assert dpt["key"] != plain["key"] and "pseudolabel" in json.dumps(dpt)

    # Run again with one more k listed: the finished run's rows are reused from its record in the
    # results directory (no stage runs), and the tables come out the same.
    capsys.readouterr()
    assert json.loads((out / "k4-d1" / S.RUN_RECORD).read_text())["run"] == "st-k4-d1"
    assert main(["study", "--config", "jobs/configs/tiny.yaml", *over]) == 0
    log = capsys.readouterr().out
    assert "reusing the finished run's rows" in log and "=== sweep" not in log, log[-3000:]
    assert pd.read_csv(out / "study.csv").equals(table)


def test_k_overrides_change_only_their_k():
    over = ["study.k_per_class=[10, 50]", "study.k_overrides={50: {filter.tau: 0.0, sweep.taus: [0.0]}}"]
    cfg = load_config("jobs/configs/fashion_mnist_study.yaml", over)
    plain = load_config("jobs/configs/fashion_mnist_study.yaml", ["study.k_per_class=[10]", "study.k_overrides={}"])
    r50, r10 = S.run_config(cfg, 50, 1), S.run_config(cfg, 10, 1)
    assert (r50.filter.tau, tuple(r50.sweep.taus), r50.ingest.k_per_class, r50.ingest.seed) == (0.0, (0.0,), 50, 1)
    assert (r10.filter.tau, tuple(r10.sweep.taus)) == (0.8, (0.8,))  # other k: the config's own
    assert S.run_key(r10, {}) == S.run_key(S.run_config(plain, 10, 1), {})
    # the same run given by command-line overrides has the same key (its finished run is reused)
    cli = load_config("jobs/configs/fashion_mnist_study.yaml", ["study.k_per_class=[50]", "study.headline_k=50",
                                                                 "study.k_overrides={}", "sweep.taus=[0.0]", "filter.tau=0.0"])
    assert S.run_key(S.run_config(cli, 50, 1), {}) == S.run_key(r50, {})
    # of the study, only the keys one run reads (its DPT arms) may differ per k; they change that k's key alone
    dpt = load_config("jobs/configs/fashion_mnist_study.yaml", [*over[:1], "study.k_overrides={50: {study.dpt: true, study.dpt_tau: 0}}"])
    assert (S.run_config(dpt, 50, 1).study.dpt, S.run_config(dpt, 50, 1).study.dpt_tau, S.run_config(dpt, 10, 1).study.dpt) == (True, 0, False)
    assert S.run_key(S.run_config(dpt, 10, 1), {}) == S.run_key(r10, {})
    nodpt = load_config("jobs/configs/fashion_mnist_study.yaml", [*over[:1], "study.k_overrides={}"])
    assert S.run_key(S.run_config(dpt, 50, 1), {}) != S.run_key(S.run_config(nodpt, 50, 1), {})
    with pytest.raises(ConfigError, match=r"study.k_overrides.50': \['study.draws'\] not in a run's sections .* or study.\{dpt, dpt_tau\}"):
        load_config(None, ["study.k_overrides={50: {study.draws: [1]}}"])
    # a misspelled or invalid key is refused when the config is loaded (--dry-run), not when its k's runs start
    with pytest.raises(ConfigError, match=r"study.k_overrides.50': unknown config key 'filter.taux' \(did you mean 'filter.tau'\?\)"):
        load_config(None, ["study.k_overrides={50: {filter.taux: 1}}"])
    with pytest.raises(ConfigError, match=r"study.k_overrides.50': config key 'filter.tau' must be in \[0, 1\]"):
        load_config(None, ["study.k_overrides={50: {filter.tau: 2}}"])


def test_run_key_covers_the_result_not_the_paths():
    cfg = load_config("jobs/configs/fashion_mnist_study.yaml")
    key = S.run_key(S.run_config(cfg, 10, 0), {"train": "h"})
    same = load_config("jobs/configs/fashion_mnist_study.yaml", ["results_dir=elsewhere", "work_dir=w", "study.k_per_class=[10, 50]"])
    assert S.run_key(S.run_config(same, 10, 0), {"train": "h"}) == key
    assert S.run_key(S.run_config(absolute_locations(cfg), 10, 0), {"train": "h"}) == key  # as the CLI resolves it
    assert S.run_key(S.run_config(cfg, 10, 0), {"train": "other"}) != key  # other data
    assert S.run_key(S.run_config(cfg, 10, 1), {"train": "h"}) != key  # another draw
    for change in ("classify.epochs=3", "study.dpt=true", "sample.guidance_scale=2.0", "study.draws=[1, 0]"):
        other = load_config("jobs/configs/fashion_mnist_study.yaml", [change])
        assert S.run_key(S.run_config(other, 10, 0), {"train": "h"}) != key, change


def test_pretraining_per_draw_or_once_for_the_study():
    cfg = load_config("jobs/configs/study.yaml", ["study.draws=[2, 0, 1]"])
    assert S.pretraining(cfg, 0) == (S.pretrain_dir(cfg, 0), True)
    assert S.pretraining(cfg, 1)[0] != S.pretraining(cfg, 0)[0]
    once = load_config("jobs/configs/study.yaml", ["study.draws=[2, 0, 1]", "study.pretrain_once=true"])
    assert [S.pretraining(once, d) for d in (2, 0, 1)] == [(S.pretrain_dir(once, 2), True)] + [(S.pretrain_dir(once, 2), False)] * 2
    own = load_config("jobs/configs/study.yaml", ["study.share_pretrain=false"])
    assert S.pretraining(own, 1) == (None, True)


def test_fine_tune_batch_is_capped_at_the_labelled_rows():
    cfg = load_config("jobs/configs/study.yaml")
    assert S._fit_batch(cfg, 50).finetune.batch_size == 50  # k=5 x 10 classes
    assert S._fit_batch(cfg, 100) is cfg  # k=10: the default recipe's 64


def test_shortfall_names_the_class(digits_dirs):
    train = str(digits_dirs["train"])
    assert S.shortfall(train, train, 1.0) is None  # a set mixes with itself at 1:1
    assert "needs" in S.shortfall(train, train, 2.0) and "class '0'" in S.shortfall(train, train, 2.0)
