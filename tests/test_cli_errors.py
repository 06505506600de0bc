"""Every bad input, through the CLI as a user runs it: one line naming the culprit, exit 2,
no traceback, and the outputs of an earlier good run untouched.

One small good ingest of the tiny config (module fixture) is the earlier run; each bad
command points at the same work and results directories. Almost every case is refused
while the config, names and paths are checked, before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = "jobs/configs/tiny.yaml"


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``, by path."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_error_line(proc: subprocess.CompletedProcess, stage: str, culprit: str) -> str:
    """A refused command's output: exit 2, no traceback, one ``synthaug <stage>: error:`` line naming ``culprit``."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"synthaug {stage}: error: ")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert culprit in lines[0], lines[0]
    return lines[0]


def synthaug(*argv: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m synthaug.cli *argv`` from the repository, with this tree first (``env``: instead of os.environ)."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("SYNTHAUG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "synthaug.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory, cli_ray):
    """A good ingest of the tiny config: the earlier outputs every bad command must leave alone.
    Commands with the tiny config join one CLI-started Ray head (``cli_ray``)."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    work, results = tmp / "work", tmp / "results"
    base = (f"work_dir={work}", f"results_dir={results}", cli_ray)
    proc = synthaug("ingest", "--config", TINY, *base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "work": work, "results": results, "base": base, "data": work / "tiny" / "data"}


def _bad_inputs(tmp: Path, data: Path) -> dict[str, Path]:
    """Files and directories that are wrong in one way each (outside the run directories)."""
    out = {}
    # Image folders: one class empty; one image corrupt.
    empty = tmp / "folder_empty"
    (empty / "a").mkdir(parents=True), (empty / "b").mkdir()
    _png(empty / "a" / "x.png")
    out["empty"] = empty
    corrupt = tmp / "folder_corrupt"
    (corrupt / "a").mkdir(parents=True), (corrupt / "b").mkdir()
    for i in range(3):
        _png(corrupt / "a" / f"x{i}.png"), _png(corrupt / "b" / f"y{i}.png")
    (corrupt / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out["corrupt"] = corrupt
    # An ingest source "x.parquet" that is text.
    (tmp / "not.parquet").write_text("id,label\n1,2\n")
    out["not_parquet"] = tmp / "not.parquet"
    # A synthetic set whose classes differ from the real set's: the val set, relabelled.
    syn = tmp / "syn_other_classes"
    shutil.copytree(data / "val", syn)
    m = json.loads((syn / "manifest.json").read_text())
    m["class_names"] = [f"c{n}" for n in m["class_names"]]
    m["counts"] = {f"c{k}": v for k, v in m.get("counts", {}).items()}
    (syn / "manifest.json").write_text(json.dumps(m))
    out["syn_other"] = syn
    # A dataset whose manifest lists a shard that is missing.
    holed = tmp / "val_missing_shard"
    shutil.copytree(data / "val", holed)
    m = json.loads((holed / "manifest.json").read_text())
    (holed / m["shards"][0]["path"]).unlink()
    out["missing_shard"] = holed
    # A generator export without its weights file.
    gen = tmp / "gen_no_weights"
    (gen / "unet").mkdir(parents=True)
    (gen / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    schema = json.loads((data / "val" / "manifest.json").read_text())["schema_version"]
    (gen / "manifest.json").write_text(json.dumps({"schema_version": schema, "family": "unet", "class_names": ["0", "1"]}))
    out["gen_no_weights"] = gen
    # A base whose config.json is not JSON.
    base = tmp / "base_bad_json"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "config.json").write_text("{not json")
    (base / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    out["bad_json"] = base
    return out


def _png(path: Path) -> None:
    from PIL import Image

    Image.new("L", (8, 8), 128).save(path)


# (name, stage, argv after the stage, the culprit the message must name); {x} fills from the paths.
CASES = [
    ("unknown config key", "ingest", ["ingest.sourc=digits"], "ingest.sourc"),
    ("bad value type", "sample", ["sample.steps=abc"], "sample.steps"),
    ("bad choice", "ingest", ["ingest.source=csv"], "ingest.source"),
    ("missing --config file", "ingest", ["--config", "{tmp}/nope.yaml"], "nope.yaml"),
    ("missing image folder", "ingest", ["ingest.source=imagefolder", "ingest.path={tmp}/no_folder"], "no_folder"),
    ("empty class folder", "ingest", ["ingest.source=imagefolder", "ingest.path={empty}"], "'b'"),
    ("ingest source not Parquet", "ingest", ["ingest.source=parquet", "ingest.path={not_parquet}"], "not.parquet"),
    ("missing Parquet source", "ingest", ["ingest.source=parquet", "ingest.path={tmp}/none.parquet"], "none.parquet"),
    ("unknown timm model", "classify", ["classify.model=resnet_does_not_exist"], "resnet_does_not_exist"),
    ("unknown timm model, whole run --dry-run", "run", ["--dry-run", "classify.model=resnet_does_not_exist"], "classify.model"),
    ("unknown generator family", "finetune", ["finetune.family=gan"], "finetune.family"),
    ("unknown UNet preset", "pretrain", ["pretrain.arch=huge"], "pretrain.arch"),
    ("unknown sampler", "sample", ["sample.sampler=euler"], "sample.sampler"),
    ("unknown extractor", "evaluate", ["evaluate.extractor=clip", "--synthetic", "{data}/val"], "evaluate.extractor"),
    ("negative ratio --dry-run", "classify", ["--dry-run", "--ratio", "-1"], "--ratio"),
    ("negative sweep ratio", "sweep", ["sweep.ratios=[-1]"], "sweep.ratios"),
    ("missing inception weights file", "evaluate",
     ["evaluate.extractor=inception-v3-compat", "evaluate.inception_weights={tmp}/inception.pth", "--synthetic", "{data}/val"],
     "inception.pth"),
    ("pretrained_path not a file", "classify", ["classify.pretrained_path={tmp}"], "classify.pretrained_path"),
    ("missing --data", "pretrain", ["--data", "{tmp}/no_data"], "--data"),
    ("missing --generator", "sample", ["--generator", "{tmp}/no_gen"], "no_gen"),
    ("generator export without weights", "sample", ["--generator", "{gen_no_weights}"], "no weights file"),
    ("missing base", "finetune", ["finetune.base={tmp}/no_base"], "no_base"),
    ("base config.json not JSON", "finetune", ["--base", "{bad_json}"], "config.json"),
    ("evaluate without --synthetic", "evaluate", [], "--synthetic"),
    ("manifest lists a missing shard", "classify", ["--dry-run", "--real", "{missing_shard}"], "missing"),
    ("synthetic classes differ from real", "classify", ["--synthetic", "{syn_other}", "--ratio", "1"], "syn_other_classes"),
    ("corrupt image", "ingest", ["ingest.source=imagefolder", "ingest.path={corrupt}", "ingest.k_per_class=0"], "bad.png"),
]


@pytest.mark.parametrize("name,stage,argv,culprit", CASES, ids=[c[0] for c in CASES])
def test_bad_input(run, name, stage, argv, culprit):
    paths = {"tmp": run["tmp"], "data": run["data"], **_paths(run)}
    argv = [a.format(**paths) for a in argv]
    if "--config" not in argv:
        argv = ["--config", TINY, *argv]
    before = tree_hashes(run["work"], run["results"])
    one_error_line(synthaug(stage, *argv, *run["base"]), stage, culprit)
    assert tree_hashes(run["work"], run["results"]) == before, "a refused command changed an earlier run's outputs"


_PATHS: dict = {}


def _paths(run) -> dict:
    if not _PATHS:
        _PATHS.update(_bad_inputs(run["tmp"], run["data"]))
    return _PATHS


def test_debug_shows_the_traceback(run):
    proc = synthaug("ingest", "--config", TINY, "--debug", "ingest.source=csv", *run["base"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ingest.source" in proc.stderr


def test_killed_ingest_then_rerun_completes(run):
    """An ingest that died before its commit (shards without manifests) completes when run again."""
    work = run["tmp"] / "killed"
    shutil.copytree(run["work"], work)
    data = work / "tiny" / "data"
    want = {s: json.loads((data / s / "manifest.json").read_text())["content_hash"] for s in ("train", "val")}
    for s in ("train", "val"):
        (data / s / "manifest.json").unlink()  # killed before the manifests (the commit) were written
    stray = data / "train" / "data" / "deadbeef"
    stray.mkdir(parents=True)
    (stray / "part-0.parquet").write_bytes(b"half a file")
    proc = synthaug("ingest", "--config", TINY, f"work_dir={work}", *run["base"][1:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = {s: json.loads((data / s / "manifest.json").read_text())["content_hash"] for s in ("train", "val")}
    assert got == want


def _class_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """Bad inputs by class of cause: config syntax, an unwritable location, a dataset no classifier
    can be trained on. (name, argv after the stage, culprit)."""
    (tmp / "flow.yaml").write_text("name: tiny\nclassify:\n  seeds: [0, 1\n  lr: 3\n")
    (tmp / "tab.yaml").write_text("name: tiny\n\tclassify: 1\n")
    (tmp / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (tmp / "a_file").write_text("not a directory")
    one = tmp / "one_class"
    (one / "only").mkdir(parents=True)
    for i in range(4):
        _png(one / "only" / f"{i}.png")
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = [(one / "only" / f"{i}.png").read_bytes() for i in range(4)]
    pq.write_table(pa.table({"image": buf, "label": [0, 0, 0, 0]}), tmp / "one_label.parquet")
    return [
        ("config: unclosed list", ["--config", f"{tmp}/flow.yaml"], "flow.yaml: YAML syntax error at line 4, column 5"),
        ("config: tab", ["--config", f"{tmp}/tab.yaml"], "tab.yaml: YAML syntax error at line 2, column 1"),
        ("config: not UTF-8", ["--config", f"{tmp}/latin1.yaml"], "latin1.yaml: not UTF-8"),
        ("override: unclosed list", ["--config", TINY, "classify.seeds=[0,1"], "classify.seeds"),
        ("work_dir under a file", ["--config", TINY, f"work_dir={tmp}/a_file/work"], "a_file"),
        ("work_dir not creatable", ["--config", TINY, "work_dir=/proc/synthaug-no-such-dir"], "/proc/synthaug-no-such-dir"),
        ("image folder of one class", ["--config", TINY, "ingest.source=imagefolder", f"ingest.path={one}"],
         "one class folder"),
        ("Parquet source of one label", ["--config", TINY, "ingest.source=parquet", f"ingest.path={tmp}/one_label.parquet"],
         "at least 2 classes"),
    ]


def test_bad_input_by_class(run):
    """Members of each error class the CASES above do not list: one line, exit 2, no traceback."""
    tmp = run["tmp"] / "by_class"
    tmp.mkdir(exist_ok=True)
    base = [b for b in run["base"] if not b.startswith("work_dir=")]
    for name, argv, culprit in _class_cases(tmp):
        work = [] if any(a.startswith("work_dir=") for a in argv) else [f"work_dir={run['work']}"]
        before = tree_hashes(run["work"], run["results"])
        proc = synthaug("ingest", *argv, *work, *base)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "Traceback" not in out, (name, out[-3000:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("synthaug ingest: error: ")]
        assert len(lines) == 1 and culprit in lines[0], (name, proc.stderr[-3000:])
        assert tree_hashes(run["work"], run["results"]) == before, name
