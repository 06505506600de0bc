"""The sweep on a tiny grid end to end (real Ray Tune), its resume, its summary, and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from synthaug.artifacts import DatasetError, read_manifest, read_table, write_dataset
from synthaug.config import ConfigError, load_config
from synthaug.data.images import decode_png, encode_png
from synthaug.sweep import run_sweep, summarize

GRID = ["classify.epochs=2", "classify.batch_size=32", "classify.seeds=[0]",
        "sweep.guidance_scales=[1.0, 3.0]", "sweep.ratios=[0, 1]", "sweep.max_concurrent=2"]


def _noisy_copy(real_dir, path, guidance: float, copies: int = 1, class_names=None) -> None:
    """A stand-in synthetic set: noisy copies of the real images, with sampler provenance."""
    real = read_table(real_dir)
    names = class_names or read_manifest(real_dir)["class_names"]
    rng = np.random.default_rng(int(guidance * 10))
    rows = {k: [] for k in ("id", "image", "label", "class_name", "source", "generator", "seed", "guidance_scale", "sampler", "steps")}
    for c in range(copies):
        for i, (png, label) in enumerate(zip(real.column("image").to_pylist(), real.column("label").to_pylist())):
            img = decode_png(png).astype(np.int16) + rng.integers(-20, 21, size=(8, 8, 1))
            rows["id"].append(f"syn-w{guidance:g}-{c}-{i}")
            rows["image"].append(encode_png(np.clip(img, 0, 255).astype(np.uint8)))
            rows["label"].append(label)
            rows["class_name"].append(names[label])
            rows["source"].append("synthetic")
            rows["generator"].append("test-noise")
            rows["seed"].append(c * 1000 + i)
            rows["guidance_scale"].append(float(guidance))
            rows["sampler"].append("none")
            rows["steps"].append(0)
    table = pa.table({**rows, "image": pa.array(rows["image"], pa.binary())})
    write_dataset(table, path, class_names=names, image_size=(8, 8), channels=1, config={"test": True})


@pytest.fixture(scope="module")
def synthetic_dirs(digits_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    for g in (1.0, 3.0):
        _noisy_copy(digits_dirs["train"], root / f"w{g:g}", g)
    return {1.0: root / "w1", 3.0: root / "w3"}


def test_sweep_tiny_grid_and_resume(ray_session, digits_dirs, synthetic_dirs, tmp_path):
    cfg = load_config(None, GRID)
    df = run_sweep(cfg, digits_dirs["train"], digits_dirs["val"], synthetic_dirs, tmp_path)

    # One row per guidance x ratio x seed; real-only ran once and is shared by both guidance rows.
    assert len(df) == 4
    assert sorted(zip(df.guidance, df.ratio)) == [(1.0, 0.0), (1.0, 1.0), (3.0, 0.0), (3.0, 1.0)]
    real = df[df.ratio == 0]
    assert real.shared_real_only.all() and real.trial_id.nunique() == 1 and real.top1.nunique() == 1
    assert df.trial_id.nunique() == 3 and (df.epochs == 2).all() and df.top1.between(0, 100).all()
    for f in ("sweep.csv", "sweep.parquet", "heatmap.png", "accuracy_vs_ratio.png", "summary.md", "sweep_config.yaml"):
        assert (tmp_path / f).is_file(), f
    assert len(pd.read_parquet(tmp_path / "sweep.parquet")) == 4
    summary = df.attrs["summary"]
    assert summary["best_ratio"] == 1.0 and "cannot be judged" in summary["verdict"]
    assert "cannot be judged" in (tmp_path / "summary.md").read_text()

    # Running again restores the finished experiment: no trial re-runs, same table.
    again = run_sweep(cfg, digits_dirs["train"], digits_dirs["val"], synthetic_dirs, tmp_path)
    pd.testing.assert_frame_equal(again, df)

    # The experiment is keyed by content: a changed classifier setting or input is another
    # experiment (never the old results), the same ones are this one.
    from synthaug.sweep import experiment

    args = (digits_dirs["train"], digits_dirs["val"], synthetic_dirs)
    name, _ = experiment(cfg, *args)
    assert (tmp_path / name).is_dir() and name.startswith("sweep-")
    assert experiment(load_config(None, GRID), *args)[0] == name
    assert experiment(load_config(None, GRID + ["classify.lr=0.0001"]), *args)[0] != name
    assert experiment(cfg, digits_dirs["train"], digits_dirs["val"], {1.0: synthetic_dirs[3.0], 3.0: synthetic_dirs[1.0]})[0] != name
    assert experiment(load_config(None, GRID + ["classify.max_failures=3"]), *args)[0] == name  # retries change nothing


def test_summary_paired_gain():
    def table(real, best):
        rows = [(1.0, 0.0, s, t) for s, t in enumerate(real)] + [(1.0, 1.0, s, t) for s, t in enumerate(best)]
        return pd.DataFrame(rows, columns=["guidance", "ratio", "seed", "top1"])

    clear = summarize(table([50, 60, 70], [55, 65, 76]))  # diffs 5, 5, 6: far beyond their std
    assert clear["gain_mean"] == pytest.approx(16 / 3) and "interval excludes 0" in clear["verdict"]
    assert clear["report_split"] == "val" and clear["beyond_noise"] and clear["gain_ci95"][0] > 0
    noisy = summarize(table([50, 60, 70], [58, 57, 72]))  # diffs 8, -3, 2: the interval holds 0
    assert "within noise" in noisy["verdict"] and not noisy["beyond_noise"]
    # With a test split: the cell is still chosen on val, the gain is reported on test.
    tested = table([50, 60, 70], [55, 65, 76]).assign(test_top1=[40, 41, 42, 40, 41, 42])
    s = summarize(tested)
    assert s["report_split"] == "test" and s["gain_mean"] == 0 and "on test" in s["verdict"] and not s["beyond_noise"]


def _bypass(cfg, section: str, **changes):
    """Set fields on a frozen, already-validated config (run_sweep must check on its own)."""
    for key, value in changes.items():
        object.__setattr__(getattr(cfg, section), key, value)
    return cfg


def test_sweep_bad_input(digits_dirs, synthetic_dirs, tmp_path):
    train, val = digits_dirs["train"], digits_dirs["val"]
    with pytest.raises(ConfigError, match="ratio -1"):
        load_config(None, GRID + ["sweep.ratios=[-1, 1]"])
    with pytest.raises(ValueError, match="ratio -1.0 < 0"):
        run_sweep(_bypass(load_config(None, GRID), "sweep", ratios=(-1.0, 1.0)), train, val, synthetic_dirs, tmp_path)
    with pytest.raises(ValueError, match="empty sweep grid"):
        run_sweep(_bypass(load_config(None, GRID), "sweep", guidance_scales=()), train, val, synthetic_dirs, tmp_path)
    with pytest.raises(ValueError, match="no synthetic dataset for guidance 3.0"):
        run_sweep(load_config(None, GRID), train, val, {1.0: synthetic_dirs[1.0]}, tmp_path)
    with pytest.raises(DatasetError, match="nowhere"):
        run_sweep(load_config(None, GRID), train, val, {1.0: synthetic_dirs[1.0], 3.0: tmp_path / "nowhere"}, tmp_path)
    odd = tmp_path / "odd"
    _noisy_copy(train, odd, 3.0, class_names=[f"digit{i}" for i in range(10)])
    with pytest.raises(ValueError, match=f"{odd}.*class names"):
        run_sweep(load_config(None, GRID), train, val, {1.0: synthetic_dirs[1.0], 3.0: odd}, tmp_path)
    with pytest.raises(ValueError, match="class '0' has 10 images, ratio 3.0 needs 30"):
        run_sweep(load_config(None, GRID[:-2] + ["sweep.ratios=[3]"]), train, val, synthetic_dirs, tmp_path)
    assert not (tmp_path / "sweep").exists()  # nothing started


def test_strength_and_tau_axes_table_and_summary(digits_dirs, synthetic_dirs):
    """The grid's settings are guidance x strength x tau; each needs its own set (checked before any
    trial), real-only is shared by all, and the best cell names its setting."""
    from synthaug.sweep import _grid, results_table, settings, validate_inputs

    cfg = load_config(None, GRID[:3] + ["sweep.guidance_scales=[1.0]", "sweep.strengths=[null, 0.3]",
                                        "sweep.taus=[0, 0.8]", "sweep.ratios=[0, 1]"])
    grid = settings(cfg)
    assert grid == [(1.0, None, 0.0), (1.0, None, 0.8), (1.0, 0.3, 0.0), (1.0, 0.3, 0.8)]
    assert [c["setting"] for c in _grid(cfg)] == [None, "w=1", "w=1 tau=0.8", "w=1 s=0.3", "w=1 s=0.3 tau=0.8"]
    # Settings as keys; a plain guidance value is the config's recipe (text-to-image, tau 0).
    dirs = {1.0: synthetic_dirs[1.0], (1.0, None, 0.8): synthetic_dirs[3.0], (1.0, 0.3, 0.0): synthetic_dirs[3.0]}
    with pytest.raises(ValueError, match=r"no synthetic dataset for w=1 s=0.3 tau=0.8 .*'sweep.strengths'"):
        validate_inputs(cfg, digits_dirs["train"], digits_dirs["val"], dirs)
    dirs[(1.0, 0.3, 0.8)] = synthetic_dirs[1.0]
    checked = validate_inputs(cfg, digits_dirs["train"], digits_dirs["val"], dirs)
    assert list(checked) == ["w=1", "w=1 tau=0.8", "w=1 s=0.3", "w=1 s=0.3 tau=0.8"]

    cells = _grid(cfg)
    top1 = {None: [80, 82], "w=1": [79, 80], "w=1 tau=0.8": [81, 83], "w=1 s=0.3": [85, 86.5], "w=1 s=0.3 tau=0.8": [84, 85]}
    trials = [({"cell": c, "seed": s}, {"top1": top1[c["setting"]][s], "top5": 99.0, "epochs": 2, "seconds": 1.0},
               f"t{i}{s}") for i, c in enumerate(cells) for s in (0, 1)]
    df = results_table(trials, grid)
    assert len(df) == 4 * 2 * 2 and list(dict.fromkeys(df.setting)) == ["w=1", "w=1 tau=0.8", "w=1 s=0.3", "w=1 s=0.3 tau=0.8"]
    assert df[df.setting == "w=1"].strength.isna().all() and (df[df.setting == "w=1 s=0.3"].strength == 0.3).all()
    assert (df[df.ratio == 0].top1.values.reshape(4, 2) == [80, 82]).all() and df[df.ratio == 0].shared_real_only.all()
    summary = summarize(df)
    assert (summary["best_setting"], summary["best_strength"], summary["best_tau"], summary["best_ratio"]) == ("w=1 s=0.3", 0.3, 0.0, 1.0)
    assert summary["gain_mean"] == pytest.approx(4.75) and summary["best_top1_std"] == pytest.approx(np.std([85, 86.5], ddof=1))
    assert "best cell on val w=1 s=0.3, ratio 1" in summary["verdict"] and "interval excludes 0" in summary["verdict"]


def test_short_filtered_cells_are_left_out_and_named(digits_dirs, synthetic_dirs, tmp_path):
    """A filtered set (tau > 0) too small for a ratio loses only those cells, named with the class
    and counts; an unfiltered set too small still stops the sweep before any trial."""
    from synthaug.sweep import _grid, experiment, short_cells, summary_markdown, validate_inputs

    train, val = digits_dirs["train"], digits_dirs["val"]
    cfg = load_config(None, GRID[:3] + ["sweep.guidance_scales=[1.0]", "sweep.taus=[0, 0.8]", "sweep.ratios=[0, 1, 3]"])
    _noisy_copy(train, tmp_path / "big", 1.0, copies=3)  # 30 per class: every ratio
    dirs = validate_inputs(cfg, train, val, {(1.0, None, 0.0): tmp_path / "big", (1.0, None, 0.8): synthetic_dirs[1.0]})
    skip = short_cells(cfg, train, dirs)
    assert skip == {("w=1 tau=0.8", 3.0): "class '0' has 10 images, ratio 3.0 needs 30"}
    cells = [(c["setting"], c["ratio"]) for c in _grid(cfg, skip)]
    assert cells == [(None, 0.0), ("w=1", 1.0), ("w=1", 3.0), ("w=1 tau=0.8", 1.0)]
    assert _grid(cfg, {}) == _grid(cfg)  # nothing short: the grid (and the experiment's key) as before
    assert experiment(cfg, train, val, dirs, skip=skip)[0] != experiment(cfg, train, val, dirs)[0]
    md = summary_markdown(pd.DataFrame({"setting": ["w=1"], "ratio": [1.0], "top1": [90.0], "seed": [0]}),
                          {"verdict": "v", "skipped": [{"setting": "w=1 tau=0.8", "ratio": 3.0, "why": skip[("w=1 tau=0.8", 3.0)]}]})
    assert "- w=1 tau=0.8 at ratio 3: the filtered set's class '0' has 10 images, ratio 3.0 needs 30" in md
    with pytest.raises(ValueError, match="class '0' has 10 images, ratio 3.0 needs 30"):
        validate_inputs(cfg, train, val, {(1.0, None, 0.0): synthetic_dirs[1.0], (1.0, None, 0.8): tmp_path / "big"})


def test_strength_and_tau_axes_bad_config():
    with pytest.raises(ConfigError, match="'sweep.strengths': 1.5 is not null or a strength"):
        load_config(None, ["sweep.strengths=[1.5]"])
    with pytest.raises(ConfigError, match="'sweep.taus': -0.1 is not a threshold"):
        load_config(None, ["sweep.taus=[-0.1]"])
    with pytest.raises(ConfigError, match="leaves no denoising step"):
        load_config(None, ["sample.steps=4", "sweep.strengths=[0.1]"])
