"""Mixing arithmetic, the PyTorch core against plain references, and Ray Train end to end."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pytest
import torch

from synthaug.artifacts import BASE_COLUMNS, commit_dataset, new_write_id, read_manifest, read_table, write_dataset, write_shard
import synthaug.keys as keyslib
from synthaug.classify import mixing
from synthaug.classify.mixing import Mixture, keys, mixture_dataset, plan_mixture
from synthaug.classify.augment import TrainCollate
from synthaug.classify.domain import DomainBatchNorm2d, convert_domain_bn, set_domain
from synthaug.classify.models import create_classifier, load_pretrained_local
from synthaug.classify.train import array_batches, evaluate, fit, fit_local
from synthaug.config import ClassifyConfig, replace

REAL_COUNTS = {"a": 4, "b": 2, "c": 3}
NAMES = list(REAL_COUNTS)


def _table(counts: dict[str, int], source: str, prefix: str, provenance: bool = False) -> pa.Table:
    rows = [(f"{prefix}-{name}-{i}", NAMES.index(name), name) for name, n in counts.items() for i in range(n)]
    cols = {
        "id": [r[0] for r in rows],
        "image": pa.array([r[0].encode() for r in rows], pa.binary()),  # opaque bytes: mixing never decodes
        "label": pa.array([r[1] for r in rows], pa.int64()),
        "class_name": [r[2] for r in rows],
        "source": [source] * len(rows),
    }
    if provenance:
        cols.update(generator=["g"] * len(rows), seed=list(range(len(rows))), guidance_scale=[2.0] * len(rows))
    return pa.table(cols)


def _write(table: pa.Table, path, shards: int = 1, names=NAMES) -> str:
    """A contract dataset of ``table`` in ``shards`` shards (rows dealt round-robin)."""
    wid = new_write_id()
    entries = [write_shard(path, wid, f"part-{k:05d}", table.take(list(range(k, table.num_rows, shards))), names)
               for k in range(shards)]
    commit_dataset(path, entries, class_names=list(names), image_size=(8, 8), channels=1, config={},
                   columns=table.column_names)
    return str(path)


@pytest.fixture(scope="module")
def real_syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    real = _write(_table(REAL_COUNTS, "real", "r"), root / "real")
    syn = _write(_table({k: 20 for k in REAL_COUNTS}, "synthetic", "s", provenance=True), root / "syn", shards=3)
    return real, syn


def mix(real, syn, ratio, seed, synthetic_only=False) -> pa.Table:
    """The mixture's rows (bounded: a test set), sorted by id."""
    t = mixture_dataset(plan_mixture(real, syn, ratio, seed, synthetic_only)).to_arrow_refs()
    import ray

    table = pa.concat_tables(ray.get(t))
    return table.sort_by("id")


def _counts(table: pa.Table) -> collections.Counter:
    return collections.Counter(zip(table.column("class_name").to_pylist(), table.column("source").to_pylist()))


def _syn_ids(t: pa.Table) -> list:
    return [i for i, s in zip(t.column("id").to_pylist(), t.column("source").to_pylist()) if s == "synthetic"]


@pytest.mark.parametrize("ratio", [0, 1, 3])
def test_mix_counts_per_class_and_source(ray_session, real_syn, ratio):
    real, syn = real_syn
    out = mix(real, syn, ratio, seed=0)
    assert tuple(out.column_names) == BASE_COLUMNS
    assert out.num_rows == 9 + round(ratio * 9)
    expected = {(k, "real"): n for k, n in REAL_COUNTS.items()}
    expected.update({(k, "synthetic"): ratio * n for k, n in REAL_COUNTS.items() if ratio})
    assert _counts(out) == expected
    assert len(set(out.column("id").to_pylist())) == out.num_rows


def test_mix_synthetic_only_and_fractional(ray_session, real_syn):
    real, syn = real_syn
    only = mix(real, syn, 1, seed=0, synthetic_only=True)
    assert _counts(only) == {(k, "synthetic"): n for k, n in REAL_COUNTS.items()}
    assert mix(real, syn, 0, seed=0, synthetic_only=True).num_rows == 60  # r = 0: all of it
    # r = 0.5: per-class shares 2, 1, 1.5 -> largest remainder to round(4.5) = 4 in total.
    half = plan_mixture(real, syn, 0.5, seed=0)
    assert half.n_synthetic == round(0.5 * 9) and sum(half.counts.values()) == 4
    assert sum(n for (_, s), n in _counts(mix(real, syn, 0.5, seed=0)).items() if s == "synthetic") == 4


def _reference(syn_table: pa.Table, counts: dict, seed: int) -> set:
    """Plain in-memory rule: class c keeps its n_c rows with the smallest key hash(seed, label, id)."""
    u = keys(syn_table.column("id"), syn_table.column("label"), seed)
    labels = np.asarray(syn_table.column("label").to_pylist())
    ids = np.asarray(syn_table.column("id").to_pylist(), dtype=object)
    out = set()
    for c, n in counts.items():
        rows = np.flatnonzero(labels == c)
        out |= set(ids[rows[np.argsort(u[rows], kind="stable")[:n]]])
    return out


@pytest.mark.parametrize("candidates", [256, 2])  # 2: forces the histogram pass (16 buckets per class)
def test_mix_is_pure_seeded_nested_and_matches_reference(ray_session, real_syn, monkeypatch, candidates):
    monkeypatch.setattr(keyslib, "CANDIDATES_PER_CLASS", candidates)
    real, syn = real_syn
    syn_table = read_table(syn)
    a, b = mix(real, syn, 1, seed=3), mix(real, syn, 1, seed=3)
    assert a.equals(b)
    assert _syn_ids(a) != _syn_ids(mix(real, syn, 1, seed=4))
    assert set(_syn_ids(a)) == _reference(syn_table, plan_mixture(real, syn, 1, 3).counts, 3)
    big = mix(real, syn, 3, seed=3)
    assert set(_syn_ids(big)) == _reference(syn_table, plan_mixture(real, syn, 3, 3).counts, 3)
    # A smaller ratio takes a subset of a larger one's synthetic rows (same seed).
    assert set(_syn_ids(a)) <= set(_syn_ids(big))
    # The spec is a small JSON-able value.
    spec = plan_mixture(real, syn, 3, 3)
    assert Mixture.from_json(spec.to_json()) == spec


def test_mix_does_not_depend_on_sharding(ray_session, real_syn, tmp_path):
    real, syn = real_syn
    one = _write(read_table(syn), tmp_path / "one", shards=1)
    assert plan_mixture(real, one, 1, 7).thresholds == plan_mixture(real, syn, 1, 7).thresholds
    assert _syn_ids(mix(real, one, 1, 7)) == _syn_ids(mix(real, syn, 1, 7))


def test_mix_bad_input(ray_session, real_syn, tmp_path):
    real, syn = real_syn
    with pytest.raises(ValueError, match="ratio must be >= 0"):
        plan_mixture(real, syn, -0.5, seed=0)
    other = _write(_table({"a": 5, "b": 5}, "synthetic", "s"), tmp_path / "other", names=["a", "z", "c"])
    with pytest.raises(ValueError, match=r"\['a', 'c', 'z'\].*\['a', 'b', 'c'\]"):
        plan_mixture(real, other, 1, seed=0)
    with pytest.raises(ValueError, match="class 'a'.*needs 40.*has 20"):
        plan_mixture(real, syn, 10, seed=0)
    with pytest.raises(ValueError, match="needs a synthetic set"):
        plan_mixture(real, None, 1, seed=0)


# ----------------------------------------------------------------------------- PyTorch core


def _u8_batch(rows, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(rows), 1, 8, 8), dtype=np.uint8)
    return {"image": images, "label": np.arange(len(rows)) % 10, "domain": np.zeros(len(rows), bool),
            "key": np.asarray(rows, dtype=np.uint64) * np.uint64(2654435761)}


def test_augmentation_is_per_sample_seeded():
    """timm's transform, seeded by (seed, epoch, row key): batch split and thread do not matter."""
    cfg = ClassifyConfig(auto_augment="rand-m9-n2-mstd0.5", re_prob=0.5, hflip=0.5)
    batch = _u8_batch(range(10))
    whole = TrainCollate(cfg, 1, (8, 8), seed=0, epoch=3)(batch)["image"]  # (10, 1, 8, 8)
    part = {k: v[4:] for k, v in batch.items()}
    again = TrainCollate(cfg, 1, (8, 8), seed=0, epoch=3)(part)["image"]
    assert whole.shape == (10, 1, 8, 8) and whole.dtype == torch.float32
    assert torch.equal(whole[4:], again)
    assert not torch.equal(whole, TrainCollate(cfg, 1, (8, 8), seed=0, epoch=4)(batch)["image"])  # fresh per epoch
    assert not torch.equal(whole, TrainCollate(cfg, 1, (8, 8), seed=0, epoch=3).for_pass(1)(batch)["image"])
    # Normalised to the [-1, 1] range; with augmentation off, exactly the plain conversion.
    assert whole.min() >= -1.0 and whole.max() <= 1.0
    plain = TrainCollate(ClassifyConfig(augment=False), 1, (8, 8), seed=0, epoch=0)(batch)["image"]
    assert torch.equal(plain, torch.from_numpy(batch["image"].astype(np.float32) / 127.5 - 1.0))


def test_augmentation_ignores_other_threads_rng_use():
    """Ray's threads draw from the global RNGs too; timm's draws must not see them (or change them).

    Also for the default recipe, which must draw from no global RNG at all (torch's included)."""
    import random
    import threading

    from synthaug.classify.augment import MixupCutmix

    cfg = ClassifyConfig(auto_augment="rand-m9-n2-mstd0.5", re_prob=0.5, hflip=0.5, mixup_alpha=0.4, cutmix_alpha=1.0)
    batch = _u8_batch(range(16))
    collate, mixup = TrainCollate(cfg, 1, (8, 8), seed=0, epoch=1), MixupCutmix(cfg, 10)
    x = collate(batch)["image"]
    y = torch.arange(16) % 10
    quiet = (x, *mixup(x, y, seed=7), TrainCollate(ClassifyConfig(), 1, (8, 8), seed=0, epoch=1)(batch)["image"])
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            random.random(), np.random.rand(), torch.rand(1)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            x2 = collate(batch)["image"]
            noisy = (x2, *mixup(x2, y, seed=7), TrainCollate(ClassifyConfig(), 1, (8, 8), seed=0, epoch=1)(batch)["image"])
            assert all(torch.equal(a, b) for a, b in zip(quiet, noisy))
    finally:
        stop.set()
        for t in threads:
            t.join()
    random.seed(123)
    expected = random.random()
    random.seed(123)
    collate(batch)
    assert random.random() == expected  # the global stream is untouched by augmentation


def test_domain_batchnorm_splits_statistics():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    dbn = DomainBatchNorm2d(bn)
    x = torch.randn(6, 3, 4, 4)
    x[3:] += 5.0  # the synthetic half has another mean
    dbn.domain = torch.tensor([False] * 3 + [True] * 3)
    out = dbn.train()(x)
    ref_real = torch.nn.functional.batch_norm(x[:3], None, None, training=True)
    ref_syn = torch.nn.functional.batch_norm(x[3:], None, None, training=True)
    assert torch.allclose(out[:3], ref_real, atol=1e-5) and torch.allclose(out[3:], ref_syn, atol=1e-5)
    assert dbn.synthetic.running_mean.mean() > dbn.real.running_mean.mean() + 0.3  # separate running stats
    # Evaluation always takes the real branch.
    dbn.eval()
    assert torch.allclose(dbn(x), dbn.real(x))
    model = convert_domain_bn(create_classifier("synthaug_cnn_tiny", 10, 1))
    assert sum(isinstance(m, DomainBatchNorm2d) for m in model.modules()) == 3
    set_domain(model, None)
    with pytest.raises(ValueError, match="classify.domain_bn.*no BatchNorm2d"):
        convert_domain_bn(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_local_pretrained_weights(tmp_path):
    """A saved 5-class model starts a 10-class one: body copied, head fresh; wrong files are named errors."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = create_classifier("synthaug_cnn_tiny", 5, 1)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        torch.manual_seed(2)
        dst = create_classifier("synthaug_cnn_tiny", 10, 1, pretrained_path=str(tmp_path / f))
        assert torch.equal(dst.features[0][0].weight, src.features[0][0].weight)
        assert dst.head.weight.shape == (10, 128)
    rgb = create_classifier("synthaug_cnn_tiny", 5, 3, pretrained_path=str(tmp_path / "w.safetensors"))  # 1 -> 3 channels
    assert rgb.features[0][0].weight.shape[1] == 3
    with pytest.raises(ValueError, match="key 'features.0.0.weight' has shape"):
        load_pretrained_local(create_classifier("synthaug_cnn_small", 5, 1), tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="classify.pretrained_path"):
        load_pretrained_local(create_classifier("synthaug_cnn_tiny", 5, 1), tmp_path / "missing.safetensors")


def test_evaluate_against_numpy():
    logits = torch.tensor(np.random.default_rng(0).normal(size=(50, 6)), dtype=torch.float32)
    labels = np.random.default_rng(1).integers(0, 6, 50)

    class Fixed(torch.nn.Module):  # returns row i of `logits` for input value i
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return logits[x[:, 0, 0, 0].long()]

    m = evaluate(Fixed(), array_batches(torch.arange(50.0).reshape(50, 1, 1, 1), labels, batch_size=7), num_classes=6)
    ranks = np.argsort(-logits.numpy(), axis=1)
    assert m["top1"] == pytest.approx(100 * np.mean(ranks[:, 0] == labels))
    assert m["top5"] == pytest.approx(100 * np.mean((ranks[:, :5] == labels[:, None]).any(1)))
    c2 = labels == 2
    assert m["per_class_top1"][2] == pytest.approx(100 * np.mean(ranks[c2, 0] == 2))


# ----------------------------------------------------------------------------- Ray


def _digits(digits_dirs):
    return str(digits_dirs["train"]), read_manifest(digits_dirs["train"])["class_names"]


def _as_mixture(digits_dirs, tmp_path) -> Mixture:
    """Real train rows plus, at ratio 1, train_full rows relabelled as 'synthetic' (a stand-in mix)."""
    other = read_table(digits_dirs["train_full"]).select(list(BASE_COLUMNS))
    other = other.set_column(other.schema.get_field_index("source"), "source", pa.array(["synthetic"] * other.num_rows))
    other = other.set_column(0, "id", pa.array(["syn-" + i for i in other.column("id").to_pylist()]))
    m = read_manifest(digits_dirs["train"])
    write_dataset(other, tmp_path / "stand-in", class_names=m["class_names"], image_size=(8, 8), channels=1, config={})
    return plan_mixture(str(digits_dirs["train"]), str(tmp_path / "stand-in"), 1.0, seed=0)


def test_fit_local_full_recipe_is_reproducible(ray_session, digits_dirs, tmp_path):
    """RandAugment + erasing + Mixup/CutMix + EMA + domain BN on a mix: same seed, same numbers."""
    _, names = _digits(digits_dirs)
    train = _as_mixture(digits_dirs, tmp_path)
    cfg = ClassifyConfig(epochs=2, batch_size=32, auto_augment="rand-m9-n2-mstd0.5", re_prob=0.25, mixup_alpha=0.2,
                         cutmix_alpha=1.0, model_ema=True, domain_bn=True)
    kw = dict(class_names=names, in_chans=1, reporter="local")
    a, b = (fit_local(cfg, train, digits_dirs["val"], seed=5, **kw) for _ in range(2))
    assert a["top1"] == b["top1"] and a["train_loss"] == b["train_loss"] and a["top1_no_ema"] == b["top1_no_ema"]
    assert a["epochs"] == 2 and a["n_train"] == 200
    c = fit_local(cfg, train, digits_dirs["val"], seed=6, **kw)
    assert c["train_loss"] != a["train_loss"]
    # Cached in the object store (classify.cache): the first epoch's file order is kept (the local
    # shuffle still reshuffles each epoch), so it repeats itself and learns as streaming does.
    cached = fit_local(replace(cfg, cache=True), train, digits_dirs["val"], seed=5, **kw)
    again = fit_local(replace(cfg, cache=True), train, digits_dirs["val"], seed=5, **kw)
    assert (cached["top1"], cached["train_loss"]) == (again["top1"], again["train_loss"])
    assert abs(cached["top1"] - a["top1"]) < 15 and cached["n_train"] == a["n_train"]


def test_fit_two_workers_and_one_task_learn_and_reuse(ray_session, digits_dirs, tmp_path):
    """Two Ray Train workers (DDP) and one worker in a Ray task; runs are reused by key.
    (test_faults.py kills a worker of each kind; two workers learning is checked there.)"""
    from synthaug.classify.models import load_classifier
    from synthaug.data.images import decode_batch, to_float

    train, names = _digits(digits_dirs)
    val = read_table(digits_dirs["val"])
    x = to_float(decode_batch(val.column("image").to_pylist()))
    cfg = ClassifyConfig(epochs=2, batch_size=16, num_workers=2)
    kw = dict(seed=0, out_dir=tmp_path, name="X", class_names=names, in_chans=1)
    first = fit(cfg, train, digits_dirs["val"], save_model=True, **kw)
    assert (first["start_epoch"], first["epochs"]) == (0, 2)
    # The saved model reproduces the reported accuracy (the two workers' val shards, reduced).
    model, meta = load_classifier(tmp_path / "model")
    assert meta["class_names"] == names and meta["image_size"] == [8, 8]
    got = evaluate(model, array_batches(x, val.column("label").to_pylist()), num_classes=10)
    assert got["top1"] == pytest.approx(first["top1"], abs=1e-4)
    # The same config and inputs: the finished run is reused (same key), not trained again.
    assert fit(cfg, train, digits_dirs["val"], save_model=True, **kw) == first
    assert len([d for d in tmp_path.glob("X-*") if d.is_dir()]) == 1  # one run, not a second

    # More epochs change the schedule, so they are another run (another key), from epoch 0; one
    # worker is a Ray task, and two CPUs for it are two torch threads (classify.cpus_per_worker).
    second = fit(ClassifyConfig(epochs=4, batch_size=16, num_workers=1, cpus_per_worker=2), train, digits_dirs["val"],
                 save_model=True, **kw)
    assert (second["start_epoch"], second["epochs"]) == (0, 4) and second["key"] != first["key"]
    assert (first["threads"], second["threads"]) == (1, 2)
    assert second["top1"] > 30.0, second  # chance is 10%
    assert second["n_train"] == 100 and len(second["per_class_top1"]) == 10

    # The saved model reproduces the reported accuracy; checkpoint state loads without pickle.
    model, _ = load_classifier(tmp_path / "model")
    got = evaluate(model, array_batches(x, val.column("label").to_pylist()), num_classes=10)
    assert got["top1"] == pytest.approx(second["top1"], abs=1e-4)
    states = sorted((tmp_path / f"X-{second['key'][:12]}").glob("checkpoint_*/state.pt"))
    assert int(torch.load(states[-1], weights_only=True)["epoch"]) == 4


def test_cpus_per_worker_is_in_the_key_only_when_not_one(digits_dirs):
    """Threads change a run's last digits, so 2 is another key; 1 (the default) keeps the keys runs had before."""
    from synthaug import identity
    from synthaug.classify.train import as_mixture, run_key

    train, names = _digits(digits_dirs)
    spec, cfg = as_mixture(train), ClassifyConfig(epochs=2)
    one, inputs = run_key(cfg, spec, digits_dirs["val"], 0, names, 1)
    fields = identity.config_fields("classify", cfg)
    assert "cpus_per_worker" not in fields
    assert one == identity.artifact_key("classify", fields, inputs, seed=0, class_names=names, in_chans=1)
    assert run_key(replace(cfg, cpus_per_worker=2), spec, digits_dirs["val"], 0, names, 1)[0] != one


def test_unknown_model_name_suggests_close_names(digits_dirs, tmp_path):
    train, names = _digits(digits_dirs)
    with pytest.raises(ValueError, match="classify.domain_bn.*no BatchNorm2d"):
        fit(ClassifyConfig(model="vit_tiny_patch16_224", domain_bn=True), train, digits_dirs["val"], seed=0,
            out_dir=tmp_path, name="bad", class_names=names, in_chans=1)
    with pytest.raises(FileNotFoundError, match="classify.pretrained_path"):
        fit(ClassifyConfig(pretrained_path=str(tmp_path / "nope.safetensors")), train, digits_dirs["val"], seed=0,
            out_dir=tmp_path, name="bad", class_names=names, in_chans=1)
    with pytest.raises(ValueError, match="unknown timm model 'synthaug_cnn_tinny'.*synthaug_cnn_tiny"):
        fit(ClassifyConfig(model="synthaug_cnn_tinny"), train, digits_dirs["val"], seed=0, out_dir=tmp_path,
            name="bad", class_names=names, in_chans=1)


def test_epoch_longer_than_the_set_replays_passes_from_memory(ray_session, digits_dirs):
    """An epoch of several passes over a small shard: one Ray Data execution, the later passes
    replayed from memory, each pass every row once, in a new seeded order; same seed, same batches."""
    from synthaug.classify.data import iterate, training_dataset
    from synthaug.classify.mixing import real_only

    spec = real_only(str(digits_dirs["train"]))
    cfg = ClassifyConfig()
    n, bs = spec.num_rows, 16
    steps = 3 * -(-n // bs)  # three passes

    def epoch(buffer_rows):
        ds = training_dataset(spec, seed=0)
        before = ds.context._execution_idx
        it = iterate(ds.iterator(), steps, cfg, batch_size=bs, seed=0, epoch=0, rank=0, in_chans=1,
                     image_size=spec.image_size, buffer_rows=buffer_rows)
        labels = [b["label"].numpy() for b in it]
        return labels, ds.context._execution_idx - before

    labels, executions = epoch(4 * n)
    assert len(labels) == steps and executions == 1
    per_pass = [np.concatenate(labels[i * (steps // 3):(i + 1) * (steps // 3)]) for i in range(3)]
    truth = np.sort(read_table(digits_dirs["train"]).column("label").to_numpy())
    assert all(np.array_equal(np.sort(p), truth) for p in per_pass)
    assert not np.array_equal(per_pass[1], per_pass[2])  # a fresh order each pass
    again, _ = epoch(4 * n)
    assert all(np.array_equal(a, b) for a, b in zip(labels, again))
    _, streamed = epoch(n // 2)  # a pass that does not fit the buffer streams again
    assert streamed == 3


def test_test_split_is_evaluated_once_with_the_final_weights(ray_session, digits_dirs):
    """test_dir: the final weights on a test split (here the val split itself: the same top-1), None without one."""
    _, names = _digits(digits_dirs)
    cfg = ClassifyConfig(epochs=2, batch_size=32, eval_every=1)
    kw = dict(seed=0, class_names=names, in_chans=1, reporter="local")
    with_test = fit_local(cfg, str(digits_dirs["train"]), digits_dirs["val"], test_dir=digits_dirs["val"], **kw)
    assert with_test["test_top1"] == with_test["top1"] > 20
    assert fit_local(cfg, str(digits_dirs["train"]), digits_dirs["val"], **kw)["test_top1"] is None


def test_two_stream_loss_is_real_plus_weighted_added():
    """A two-stream batch: loss = real loss + added_weight x added loss (checked on a model without batch statistics)."""
    from synthaug.classify.core import train_epoch, two_stream

    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 4, 4), torch.randint(0, 3, (12,))
    real = {"image": x[:8], "label": y[:8], "domain": torch.zeros(8, dtype=torch.bool)}
    added = {"image": x[8:], "label": y[8:], "domain": torch.ones(4, dtype=torch.bool)}

    def step(batches, weight):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        torch.nn.init.constant_(model[1].weight, 0.01), torch.nn.init.zeros_(model[1].bias)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        train_epoch(model, batches, opt, None, torch.nn.CrossEntropyLoss(), "cpu", added_weight=weight)
        return model[1].weight.detach().clone()

    only_real = step([real], 1.0)
    assert torch.equal(step(list(two_stream([real], [added])), 0.0), only_real)  # weight 0: the added rows do nothing
    ce = torch.nn.CrossEntropyLoss()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    torch.nn.init.constant_(model[1].weight, 0.01), torch.nn.init.zeros_(model[1].bias)
    (ce(model(x[:8]), y[:8]) + 0.5 * ce(model(x[8:]), y[8:])).backward()
    expected = 0.01 - model[1].weight.grad
    assert torch.allclose(step(list(two_stream([real], [added])), 0.5), expected, atol=1e-6)


def test_two_stream_and_soft_targets_train(ray_session, digits_dirs, tmp_path):
    """Two-stream batches with distillation from a saved teacher: they train, repeat, and differ from one stream."""
    from synthaug.classify.core import Distiller, classifier_meta
    from synthaug.classify.models import build_classifier, save_classifier
    from synthaug.errors import InputValueError

    _, names = _digits(digits_dirs)
    train = _as_mixture(digits_dirs, tmp_path)
    base = ClassifyConfig(epochs=2, batch_size=32)
    teacher = tmp_path / "teacher"
    save_classifier(build_classifier(base, len(names), 1, 3), teacher, classifier_meta(base, names, 1, (8, 8)))
    kd = replace(base, added_batch=16, added_weight=0.5, kd_teacher=str(teacher), kd_weight=0.5)
    d = Distiller([str(teacher)], kd, "cpu")  # the distillation term vanishes when the student is the teacher
    xb = torch.randn(5, 1, 8, 8)
    t_logits = d.models[0](xb)
    assert d.loss(t_logits, xb).abs() < 1e-5 and d.loss(-t_logits, xb) > 0.01
    kw = dict(class_names=names, in_chans=1, reporter="local", seed=0)
    one = fit_local(base, train, digits_dirs["val"], **kw)
    two = fit_local(replace(kd, kd_teacher=""), train, digits_dirs["val"], **kw)
    soft, again = (fit_local(kd, train, digits_dirs["val"], **kw) for _ in range(2))
    assert soft["train_loss"] == again["train_loss"] and soft["top1"] == again["top1"]
    assert len({one["train_loss"], two["train_loss"], soft["train_loss"]}) == 3
    assert two["top1"] > 20 and soft["epochs"] == 2  # 2 epochs: well above chance (10), whichever stand-in rows are drawn
    with pytest.raises(InputValueError, match="two-stream batches need real rows and added ones"):
        fit_local(replace(kd, kd_teacher=""), str(digits_dirs["train"]), digits_dirs["val"], **kw)
    with pytest.raises(InputValueError, match="not a saved classifier"):
        fit_local(replace(kd, kd_teacher=str(tmp_path)), train, digits_dirs["val"], **kw)
