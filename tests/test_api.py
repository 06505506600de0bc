"""The Python API as a notebook user calls it.

``docs/walkthrough.py`` is executed end to end (one module fixture, the suite's only
in-process tiny run): ``synthaug.run`` on the default config with tiny overrides, one
stage call (``synthaug.sample``) on its fine-tuned generator, and that set opened with
Hugging Face ``datasets``. Bad input raises the one-line InputError the CLI prints, before
any work; the forms of overrides agree; ``import synthaug`` loads neither torch nor Ray.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from synthaug import api
from synthaug.artifacts import is_complete, read_manifest
from synthaug.cli import main
from synthaug.errors import InputError, InputNotFound, first_line

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "docs" / "walkthrough.py"
TINY = str(ROOT / "jobs" / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory, ray_session, mlflow_server):
    """docs/walkthrough.py run as a script from an empty directory, its MLflow cell against a real local
    server; its globals, its output dir and that directory."""
    out, cwd = tmp_path_factory.mktemp("walkthrough"), tmp_path_factory.mktemp("walkthrough_cwd")
    saved = {k: os.environ.get(k) for k in ("SYNTHAUG_WALKTHROUGH_DIR", "SYNTHAUG_MLFLOW_URI")}
    os.environ["SYNTHAUG_WALKTHROUGH_DIR"] = str(out)
    os.environ["SYNTHAUG_MLFLOW_URI"] = mlflow_server.wait()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        g = runpy.run_path(str(WALKTHROUGH), run_name="__main__")
    finally:
        os.chdir(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"g": g, "out": out, "cwd": cwd}


def test_walkthrough_run(walkthrough):
    """``synthaug.run``: its metrics are metrics.json, and every location it returns is a finished artifact."""
    res, out = walkthrough["g"]["result"], walkthrough["out"]
    assert isinstance(res, api.RunResult)
    assert res.results_dir == str(out / "results" / "walkthrough") and res.work_dir == str(out / "runs" / "walkthrough")
    m = res.metrics
    assert json.loads((Path(res.results_dir) / "metrics.json").read_text()).keys() == m.keys()
    assert m["run"] == "walkthrough" and m["seeds"] == 1 and m["headline_guidance"] == 2.0
    for k in ("real_only_top1_mean", "real_plus_synthetic_top1_mean", "cas_top1_mean_w2", "pseudo_label_top1_mean"):
        assert 0 <= m[k] <= 100, k
    assert m["fid_w2"] > 0 and 0 <= m["near_copy_share_w2"] <= 1
    assert (Path(res.results_dir) / "summary.md").is_file()
    assert set(res.datasets) == {"train", "val", "pool", "train_full"}
    assert read_manifest(res.datasets["train"])["num_rows"] == 5 * 10  # ingest.k_per_class x digits' classes
    gen = read_manifest(res.generator)
    assert gen["stage"] == "finetune" and gen["steps"] == 10
    assert list(res.synthetic) == [2.0] and read_manifest(res.synthetic[2.0])["num_rows"] == 8 * 10
    # The run's config records: the last success's, and no attempt left behind.
    assert (Path(res.work_dir) / "config.run.yaml").is_file()
    assert not list(Path(res.work_dir).glob("*.attempt.yaml"))


def test_walkthrough_mlflow_view(walkthrough):
    """The MLflow cell: the run again with tracking on (everything reused by key) lands as a parent run with a
    child per stage, each reused artifact tagged."""
    runs = walkthrough["g"]["runs"]
    parent = runs[runs["tags.mlflow.runName"] == "walkthrough run"]
    assert len(parent) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    assert {"ingest", "finetune", "sweep"} <= set(children["tags.mlflow.runName"])
    assert (runs["tags.synthaug.reused"] == "true").any()


def test_walkthrough_stage_call_and_datasets(walkthrough):
    """``synthaug.sample`` on the run's config and generator; the set it wrote, read by Hugging Face ``datasets``."""
    g = walkthrough["g"]
    res, more, ds, first = g["result"], g["more"], g["ds"], g["first"]
    assert isinstance(more, api.SampleResult) and is_complete(more.dataset) and more.dataset not in res.synthetic.values()
    m = read_manifest(more.dataset)
    assert m["num_rows"] == more.metrics["num_rows"] == 4 * 10
    assert m["sample"]["guidance_scale"] == 1.0 and more.config.sample.steps == res.config.sample.steps
    assert (Path(res.work_dir) / "config.sample.yaml").is_file()
    assert len(ds) == 40 and sorted(set(ds["label"])) == list(range(10))
    assert first["image"].size == (8, 8) and first["class_name"] == m["class_names"][first["label"]]


def test_walkthrough_writes_only_under_its_dir(walkthrough):
    assert list(walkthrough["cwd"].iterdir()) == []
    assert {p.name for p in walkthrough["out"].iterdir()} <= {"runs", "results", "hf-datasets"}


def _cli_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(f"synthaug {argv[0]}: error: ")]
    assert len(lines) == 1
    return lines[0].split(": error: ", 1)[1]


@pytest.mark.parametrize("call,argv", [
    (lambda w: api.ingest(TINY, [f"work_dir={w}", "ingest.sourc=digits"]), ["ingest", "ingest.sourc=digits"]),
    (lambda w: api.run(TINY, {"work_dir": w, "ingest": {"sourc": "digits"}}), ["run", "ingest.sourc=digits"]),
    (lambda w: api.sample(TINY, work_dir=w, sample={"steps": "abc"}), ["sample", "sample.steps=abc"]),
    (lambda w: api.classify(TINY, work_dir=w, classify={"model": "resnet_does_not_exist"}),
     ["classify", "classify.model=resnet_does_not_exist"]),
    (lambda w: api.sample(TINY, work_dir=w, generator=f"{w}-no_gen"), ["sample", "--generator", "{w}-no_gen"]),
], ids=["override string", "override mapping", "override keyword", "unknown timm model", "missing generator"])
def test_bad_input_is_the_clis_one_line_error(tmp_path, capsys, call, argv):
    work = str(tmp_path / "work")
    with pytest.raises(InputError) as e:
        call(work)
    cli = _cli_error(capsys, argv[0], "--config", TINY, *[a.format(w=work) for a in argv[1:]], f"work_dir={work}")
    assert first_line(e.value) == cli
    assert not os.path.exists(work), "refused before any work"


def test_missing_yaml(tmp_path, capsys):
    with pytest.raises(InputNotFound, match="nope.yaml") as e:
        api.run(tmp_path / "nope.yaml")
    assert isinstance(e.value, FileNotFoundError) and len(str(e.value).splitlines()) == 1
    assert "nope.yaml" in _cli_error(capsys, "run", "--config", str(tmp_path / "nope.yaml"))


def test_override_forms_agree():
    """CLI strings, a mapping (dotted keys or sections), keywords and a Config base give the same config."""
    want = api.load(TINY, ["sample.per_class=3", "classify.seeds=[1, 2]", "name=x"])
    assert want.sample.per_class == 3 and want.sample.steps == 4  # the YAML's other sample keys stay
    assert api.load(TINY, {"sample": {"per_class": 3}, "classify.seeds": [1, 2], "name": "x"}) == want
    assert api.load(TINY, name="x", sample={"per_class": 3}, classify={"seeds": (1, 2)}) == want
    assert api.load(api.load(TINY), ["sample.per_class=3"], classify={"seeds": [1, 2]}, name="x") == want
    assert api.load(TINY) != want


def test_import_synthaug_is_cheap():
    code = ("import sys, synthaug; heavy = lambda: sorted(m for m in ('torch', 'ray', 'timm', 'diffusers') if m in sys.modules); "
            "a = heavy(); f = synthaug.run; import synthaug.api; print(a, heavy(), f is synthaug.api.run)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "[]", "True"]
