"""Bad input by class of cause, through the CLI: each class with members that
tests/test_cli_errors.py does not list, and each must give one line naming the file,
location, row or key, exit 2, no traceback, and leave an earlier run's outputs untouched.

Classes: configuration syntax; local filesystem errors on a user's location; object-storage
errors (on the S3 server of tests/s3server.py, each within a bound); decoder errors on an
image, in the driver's stages and inside Ray tasks; dataset-level impossibilities. The last
tests raise real OS and object-store errors inside Ray tasks and check that the rule finds
them behind Ray's wrappers.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from test_cli_errors import ROOT, TINY, _png, one_error_line, synthaug, tree_hashes

from synthaug.errors import find_input_error, first_line

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, cli_ray):
    """A good ingest of the tiny config: the outputs every refused command must leave alone.
    Commands with a config join one CLI-started Ray head (``cli_ray``)."""
    tmp = tmp_path_factory.mktemp("error_classes")
    work, results = tmp / "work", tmp / "results"
    base = [f"results_dir={results}", cli_ray]
    proc = synthaug("ingest", "--config", TINY, f"work_dir={work}", *base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "work": work, "results": results, "base": base, "data": work / "tiny" / "data"}


def refused(earlier, stage: str, argv: list[str], culprit: str, env: dict | None = None, work: bool = True) -> str:
    """Run a command that must be refused: one error line naming ``culprit``, exit 2, no traceback,
    the earlier run unchanged. Returns the line."""
    before = tree_hashes(earlier["work"], earlier["results"])
    extra = [f"work_dir={earlier['work']}"] if work and not any(a.startswith("work_dir=") for a in argv) else []
    line = one_error_line(synthaug(stage, *argv, *extra, *(earlier["base"] if "--config" in argv else []), env=env),
                          stage, culprit)
    assert tree_hashes(earlier["work"], earlier["results"]) == before, "a refused command changed an earlier run"
    return line


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _folder(root: Path, n: int = 3) -> Path:
    """An image folder with classes a and b, ``n`` good images each."""
    for c in "ab":
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _png(root / c / f"{i}.png")
    return root


# ----------------------------------------------------------------------------- 1. configuration syntax


def test_config_syntax(earlier):
    tmp = earlier["tmp"]
    (tmp / "quote.yaml").write_text('name: "tiny\nclassify:\n  lr: 1\n')
    (tmp / "nested.yaml").write_text("name: tiny\ningest: source: digits\n")
    refused(earlier, "ingest", ["--config", f"{tmp}/quote.yaml"], "quote.yaml: YAML syntax error at line 4, column 1")
    refused(earlier, "ingest", ["--config", f"{tmp}/nested.yaml"], "nested.yaml: YAML syntax error at line 2, column 15")
    refused(earlier, "ingest", ["--config", TINY, "sweep.ratios={a"], "override 'sweep.ratios={a': YAML syntax error")


# ----------------------------------------------------------------------------- 2. local filesystem


def test_filesystem_locations(earlier):
    tmp = earlier["tmp"]
    long = tmp / ("x" * 300)
    os.symlink("loop_b", tmp / "loop_a"), os.symlink("loop_a", tmp / "loop_b")
    (tmp / "a_file").write_text("not a directory")
    line = refused(earlier, "ingest", ["--config", TINY, f"work_dir={long}"], "File name too long")
    assert str(long) in line
    refused(earlier, "ingest", ["--config", TINY, f"work_dir={tmp}/loop_a/w"], "Too many levels of symbolic links")
    # Outside the storage layer (diffusers' save_pretrained): the rule by errno names the path.
    assert refused(earlier, "tiny-base", ["--family", "unet", "--out", f"{tmp}/a_file/base"], "a_file", work=False)


def test_disk_full(earlier):
    """ENOSPC from a real full filesystem: a 64 KiB tmpfs, filled, in a private mount namespace."""
    mnt = earlier["tmp"] / "full"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    cmd = (f"mount -t tmpfs -o size=64k tmpfs {mnt} && mkdir {mnt}/w && (cat /dev/zero > {mnt}/filler 2>/dev/null; true) && "
           f"exec python -m synthaug.cli ingest --config {TINY} work_dir={mnt}/w results_dir={earlier['results']}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("SYNTHAUG_DEBUG", None)
    before = tree_hashes(earlier["work"], earlier["results"])
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("synthaug ingest: error: ")]
    assert len(lines) == 1 and f"{mnt}/w" in lines[0] and "No space left on device" in lines[0], proc.stderr[-3000:]
    assert tree_hashes(earlier["work"], earlier["results"]) == before


# ----------------------------------------------------------------------------- 3. object storage


def test_object_storage(earlier, s3_server):
    """Unreachable endpoints, bad credentials and a missing bucket: one line naming the URI, in bounded time."""
    import s3server

    port = s3server.free_ports(1)[0]  # nothing listens there
    loc = s3_server.root("work")
    cases = [
        ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}, [f"work_dir={loc}"], "endpoint unreachable"),
        ({"AWS_ENDPOINT_URL": "http://192.0.2.1:9"}, [f"work_dir={loc}"], "endpoint unreachable"),  # TEST-NET-1
        # The first call is the run's lease: a GET, whose bare 403 for a bad key reads "access denied
        # (check the credentials ...)"; a PUT's says "bad credentials". Either names the credentials.
        ({"AWS_ACCESS_KEY_ID": "nobody"}, [f"work_dir={loc}"], "credentials"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, [f"work_dir={loc}"], "credentials"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, ["ingest.source=imagefolder", f"ingest.path={loc}/imgs"], f"{loc}/imgs"),
        ({}, ["ingest.source=parquet", "ingest.path=s3://no-such-bucket-synthaug/x.parquet"], "s3://no-such-bucket-synthaug"),
    ]
    for env, argv, culprit in cases:
        t0 = time.time()
        line = refused(earlier, "ingest", ["--config", TINY, *argv], culprit, env={**os.environ, **s3_server.env, **env})
        assert time.time() - t0 < 60, (argv, env, time.time() - t0)
        assert "s3://" in line, line


# ----------------------------------------------------------------------------- 4. image decoding


def _bad_images(root: Path) -> dict[str, Path]:
    """Image folders with one bad image each (Pillow really raises on each)."""
    out = {}
    # A decompression bomb: a 30000 x 30000 PNG header (Pillow refuses before decoding).
    bomb = _folder(root / "bomb")
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    (bomb / "b" / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 8))
                                          + _chunk(b"IEND", b""))
    out["bomb"] = bomb / "b" / "huge.png"
    # A PNG cut inside its pixel data.
    import numpy as np
    from PIL import Image

    cut = _folder(root / "cut")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(buf, format="PNG")
    (cut / "a" / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["cut"] = cut / "a" / "cut.png"
    # Text in a file named .jpg.
    text = _folder(root / "text")
    (text / "b" / "notes.jpg").write_text("these are my notes, not a photo\n")
    out["text"] = text / "b" / "notes.jpg"
    return out


def test_bad_image_in_ingest_tasks(earlier):
    """Decoded inside Ray Data tasks: the line names the file, not Ray's 'Failed to apply UDF' wrapper."""
    for name, bad in _bad_images(earlier["tmp"] / "images").items():
        line = refused(earlier, "ingest", ["--config", TINY, "ingest.source=imagefolder", f"ingest.path={bad.parent.parent}",
                                           "ingest.k_per_class=0"], str(bad))
        assert "UDF" not in line, (name, line)


def test_bad_image_in_a_contract_dataset(earlier):
    """A contract dataset whose PNGs are cut short, read by classify's Ray tasks: the line names a row id."""
    import pyarrow as pa

    from synthaug.artifacts import read_manifest, read_table, write_dataset

    val = earlier["data"] / "val"
    m, t = read_manifest(val), read_table(val)
    cut = [b[: len(b) // 2] for b in t.column("image").to_pylist()]  # every row: whichever the mixture draws
    t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(cut, pa.binary()))
    syn = earlier["tmp"] / "syn_cut_rows"
    write_dataset(t, str(syn), class_names=m["class_names"], image_size=tuple(m["image_size"]), channels=m["channels"],
                  config={})
    line = refused(earlier, "classify", ["--config", TINY, "--synthetic", str(syn), "--ratio", "1"], "row 'digits-")
    assert "unreadable or truncated image (OSError: image file is truncated)" in line, line


# ----------------------------------------------------------------------------- 5. dataset-level


def test_dataset_impossibilities(earlier):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = earlier["tmp"] / "datasets"
    small = _folder(tmp / "three_each")  # the tiny config's k_per_class is 5
    refused(earlier, "ingest", ["--config", TINY, "ingest.source=imagefolder", f"ingest.path={small}"],
            "ingest.k_per_class=5 is larger than class 'a'")
    single = _folder(tmp / "single")
    for p in list((single / "b").iterdir())[1:]:
        p.unlink()
    refused(earlier, "ingest", ["--config", TINY, "ingest.source=imagefolder", f"ingest.path={single}", "ingest.k_per_class=0"],
            "class 'b' has 1 image(s)")
    png = (small / "a" / "0.png").read_bytes()
    pq.write_table(pa.table({"image": [png] * 6, "label": [0, 0, 0, 2, 2, 2]}), tmp / "gap.parquet")  # no row of class 1
    refused(earlier, "ingest", ["--config", TINY, "ingest.source=parquet", f"ingest.path={tmp}/gap.parquet",
                                "ingest.k_per_class=0"], "class '1' has 0 image(s)")


# ----------------------------------------------------------------------------- image folders


def test_imagefolder_nested_links_through_the_cli(earlier):
    """Sub-folders are ingested (as torchvision's ImageFolder), a link back up the tree ends, a
    self-referential link is refused naming it."""
    import json

    root = _folder(earlier["tmp"] / "nested", n=2)
    (root / "a" / "sub" / "deeper").mkdir(parents=True)
    _png(root / "a" / "sub" / "x.png"), _png(root / "a" / "sub" / "deeper" / "y.png")
    os.symlink("../..", root / "a" / "sub" / "deeper" / "up")  # a/sub/deeper/up -> a: walked once
    work = earlier["tmp"] / "nested_work"
    proc = synthaug("ingest", "--config", TINY, "ingest.source=imagefolder", f"ingest.path={root}", "ingest.k_per_class=0",
                    f"work_dir={work}", *earlier["base"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ms = [json.loads((work / "tiny" / "data" / s / "manifest.json").read_text()) for s in ("train", "val")]
    assert sum(m["counts"]["a"] for m in ms) == 4 and sum(m["counts"]["b"] for m in ms) == 2
    os.symlink("self.png", root / "b" / "self.png")
    refused(earlier, "ingest", ["--config", TINY, "ingest.source=imagefolder", f"ingest.path={root}", "ingest.k_per_class=0"],
            f"{root}/b/self.png: broken symbolic link")


# ----------------------------------------------------------------------------- inside Ray tasks


def test_classes_found_behind_ray_wrappers(ray_session, tmp_path):
    """Real OS and object-store errors raised in a Ray task and a Ray Data task reach the rule as one line."""
    import ray

    import s3server
    from synthaug import storage

    (tmp_path / "a_file").write_text("x")
    under_file = str(tmp_path / "a_file" / "out")

    @ray.remote
    def makedirs(path):
        os.makedirs(path)

    with pytest.raises(Exception) as e:
        ray.get(makedirs.remote(under_file))
    assert first_line(find_input_error(e.value)) == f"{under_file}: Not a directory"

    endpoint = f"127.0.0.1:{s3server.free_ports(1)[0]}"

    def upload(batch):
        fs = storage._s3(f"http://{endpoint}", "us-east-1")
        with fs.open_output_stream("some-bucket/some/key.parquet") as f:
            f.write(b"x")
        return batch

    t0 = time.time()
    with pytest.raises(Exception) as e:
        ray.data.range(1).map_batches(upload).materialize()
    assert time.time() - t0 < 60
    assert first_line(find_input_error(e.value)).startswith("s3://some-bucket/some/key.parquet: endpoint unreachable")
