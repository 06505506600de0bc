"""The teacher, the pseudo-label baseline and confidence filtering of synthetic sets.

The **teacher** is the real-only classifier of the run: ``classify.*`` trained on the
labelled set with seed ``pseudolabel.teacher_seed``. It is the same keyed run as
``synthaug classify --ratio 0`` with that seed (same mixture, name and place), so a run
that already has it reuses it (``train.fit`` returns the recorded result; only the model
export is added when it is missing).

**Pseudo-labels** (:func:`label_pool`): the teacher scores every row of the unlabelled
pool in a Ray Data actor pool (:class:`TeacherActor`: load once, ``__call__`` pure) and the
confident rows are written as a contract dataset (``label`` = the teacher's class,
``source`` = ``real``, plus ``confidence`` and ``teacher``), keyed by the teacher's key,
the pool's content hash and the selection:

* ``select: threshold`` keeps rows whose top probability is >= ``threshold``: a filter
  inside the actor, one streaming pass;
* ``select: top_fraction`` keeps, per predicted class, the ``ceil(top_fraction x n_c)``
  most confident rows (ties by id hash): ``groupby(label).map_groups`` in Ray Data,
  so each class is ranked in a worker, never in the driver.

**Students** (:func:`train_students`) train on labelled + pseudo-labelled rows with the
same recipe and the same optimiser steps as real-only: the pseudo-labelled set is the
mixture's ``extra`` part, which is not counted in the epoch length (``|real|`` images),
as a synthetic ratio is not (``mixing``).

**Filtering** (:func:`filter_synthetic`): a synthetic row is kept when the teacher's
probability of its intended label is >= ``filter.tau``. The output is a new keyed
contract dataset (provenance columns kept, plus ``teacher_prob``) that then goes
through the ordinary mixing, so mixtures stay class-balanced, seeded, nested across
ratios and a pure function of their inputs. Its manifest records the share kept per class.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from synthaug import identity, raylocal, storage
from synthaug.artifacts import BASE_COLUMNS, id_hashes, read_manifest, read_ray, write_dataset
from synthaug.classify.mixing import plan_mixture
from synthaug.config import Config, to_dict
from synthaug.errors import InputValueError
from synthaug.keys import ALL, kth_smallest


# ----------------------------------------------------------------------------- the teacher


def teacher_name(seed: int) -> str:
    """The run name ``synthaug classify --ratio 0`` gives the same real-only run."""
    return f"r0-mix-seed{int(seed)}"


def train_teacher(cfg: Config, train: str, val: str, out_dir: str) -> dict:
    """The real-only classifier of seed ``pseudolabel.teacher_seed``, exported at ``out_dir/model``.

    Returns ``{"model": location, "key": run key, "metrics": {...}}``. ``out_dir`` is the
    run's ``classify/`` directory, where ``synthaug classify`` keeps the same runs.
    """
    from synthaug.classify.train import fit

    seed = int(cfg.pseudolabel.teacher_seed)
    m = read_manifest(train)
    spec = plan_mixture(str(train), None, 0.0, seed)
    metrics = fit(cfg.classify, spec, str(val), seed=seed, out_dir=out_dir, name=teacher_name(seed),
                  class_names=m["class_names"], in_chans=int(m["channels"]), ray_cfg=cfg.ray, save_model=True)
    return {"model": storage.join(storage.absolute(str(out_dir)), "model"), "key": metrics["key"], "metrics": metrics}


def teacher_classes(teacher: dict) -> list[str]:
    """The class names of a teacher's export (its ``classifier.json``)."""
    return list(storage.read_json(storage.join(teacher["model"], "classifier.json"))["class_names"])


class TeacherActor:
    """Ray Data actor: the teacher's softmax on a batch of contract rows.

    ``mode="pseudo"``: the rows get the teacher's class as ``label`` / ``class_name``, its
    probability as ``confidence``, and (with ``threshold``) only rows at or above it are
    returned. ``mode="filter"``: the rows keep their label and get ``teacher_prob``, the
    probability of that label; only rows at or above ``threshold`` are returned. The
    model is built once per actor; ``__call__`` is a pure function of the batch.
    """

    def __init__(self, model_dir: str, mode: str, threshold: float | None, teacher_key: str, class_names,
                 device: str | None = None):
        import torch

        from synthaug.classify.models import load_classifier

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.meta = load_classifier(model_dir)
        self.model.to(self.device)
        self.mode, self.threshold, self.key = mode, threshold, teacher_key
        self.names = np.asarray(list(class_names), dtype=object)

    def probabilities(self, pngs) -> np.ndarray:
        """PNG bytes -> float32 (B, K) softmax probabilities (the Ray-free core)."""
        import torch

        from synthaug.data.images import decode_batch, to_float

        if len(pngs) == 0:
            return np.zeros((0, len(self.names)), np.float32)
        x = torch.from_numpy(to_float(decode_batch(pngs))).to(self.device)  # (B, C, H, W) in [-1, 1]
        with torch.no_grad():
            logits = self.model(x).float()  # (B, K)
        return torch.softmax(logits, dim=1).cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        probs = self.probabilities(batch.column("image").to_pylist())  # (B, K)
        batch = batch.select([c for c in batch.column_names if c not in ("confidence", "teacher_prob", "teacher")])
        if self.mode == "pseudo":
            label = probs.argmax(1).astype(np.int64)
            score = probs[np.arange(len(label)), label]
            out = batch.select([c for c in batch.column_names if c not in ("label", "class_name", "source")])
            out = out.append_column("label", pa.array(label, pa.int64()))
            out = out.append_column("class_name", pa.array(self.names[label].tolist() if len(label) else [], pa.string()))
            out = out.append_column("source", pa.array(["real"] * len(label), pa.string()))
            out = out.append_column("confidence", pa.array(score.astype(np.float64), pa.float64()))
        else:
            label = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
            score = probs[np.arange(len(label)), label] if len(label) else np.zeros(0, np.float32)
            out = batch.append_column("teacher_prob", pa.array(score.astype(np.float64), pa.float64()))
        out = out.append_column("teacher", pa.array([self.key] * len(label), pa.string()))
        if self.threshold is not None:
            out = out.filter(pa.array(score >= self.threshold))
        return out


def _scored(cfg: Config, loc: str, teacher: dict, mode: str, threshold: float | None, columns=None):
    """``loc``'s rows through a :class:`TeacherActor` pool (lazy Ray Dataset)."""
    pl = cfg.pseudolabel
    ds = read_ray(loc, columns=columns)
    # Always an actor pool, also for a small set (raylocal.map_pool_kwargs): its output blocks
    # become the labelled set's shards, and the students' seeded order depends on them.
    return ds.map_batches(
        TeacherActor, batch_size=pl.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs=dict(model_dir=teacher["model"], mode=mode, threshold=threshold, teacher_key=teacher["key"],
                                   class_names=teacher_classes(teacher)),
        **raylocal.actor_pool_kwargs(pl.min_actors, pl.max_actors, pl.num_gpus_per_actor),
    )


# ----------------------------------------------------------------------------- pseudo-labels


def selection(cfg: Config) -> dict:
    """The config fields that decide which pool rows are kept (part of the set's key)."""
    pl = cfg.pseudolabel
    return {"select": pl.select, pl.select: pl.threshold if pl.select == "threshold" else pl.top_fraction}


def describe_selection(cfg: Config) -> str:
    """The selection in words, for reports: which pool rows the students train on."""
    pl = cfg.pseudolabel
    if pl.select == "threshold":
        return f"rows with top probability >= {pl.threshold:g}"
    return f"the top {pl.top_fraction:g} of each predicted class (most confident first)"


def confidence_keys(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, uint64 keys) ordering a class's rows most confident first, then by id hash.

    The confidences are float32 probabilities (stored as float64), so their float32 bits,
    inverted, order them exactly; the low 32 bits break ties by id hash.
    """
    lab = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    conf = batch.column("confidence").to_numpy(zero_copy_only=False).astype(np.float32)
    high = (np.uint64(0xFFFFFFFF) - conf.view(np.uint32).astype(np.uint64)) << np.uint64(32)
    tie = id_hashes(batch.column("id").to_numpy(zero_copy_only=False)) >> np.uint64(32)
    return lab, high | tie


def _keep_top(batch: pa.Table, cut: dict, num_classes: int) -> pa.Table:
    """Ray Data map fn: the rows whose confidence key is within their predicted class's cut."""
    lab, u = confidence_keys(batch)
    limit = np.zeros(num_classes, np.uint64)
    for c, t in cut.items():
        limit[int(c)] = np.uint64(2**64 - 1) if int(t) == ALL else np.uint64(int(t))
    return batch.filter(pa.array(u <= limit[lab]))


def top_fraction(ds, fraction: float, num_classes: int):
    """Per predicted class, its ``ceil(fraction x n)`` most confident rows (ties by id hash), in ``ds``'s order.

    ``ds`` is materialised once (the scored rows, in Ray's object store, as a groupby would
    hold them), its per-class cut found by ``keys.kth_smallest`` (bounded passes), and its
    rows filtered in place: the set keeps the pool's layout, which mixes classes, where a
    groupby would write one class per shard.
    """
    ds = ds.materialize()
    have = {int(r["label"]): int(r["count()"]) for r in ds.groupby("label").count().take_all()}
    need = {c: math.ceil(fraction * n) for c, n in have.items()}
    cut = kth_smallest(ds.select_columns(["id", "label", "confidence"]), need, have, confidence_keys)
    return ds.map_batches(_keep_top, fn_kwargs={"cut": cut, "num_classes": num_classes}, batch_format="pyarrow",
                          batch_size=None)


def pseudolabel_key(cfg: Config, teacher: dict, pool: str) -> str:
    return identity.artifact_key("pseudolabel", selection(cfg), {"teacher": teacher["key"], "pool": identity.dataset_hash(pool)})


def label_pool(cfg: Config, teacher: dict, pool: str, out: str) -> dict:
    """Write the confident pool rows, labelled by the teacher, to ``out``; returns the manifest.

    A complete ``out`` with the same key is reused. The manifest holds ``key``,
    ``pool_rows`` and ``kept_share`` (kept rows / pool rows).
    """
    key = pseudolabel_key(cfg, teacher, pool)
    done = identity.reuse(out, key, "pseudolabel", "the pseudo-labelled set")
    if done is not None:
        return done
    pool_m = read_manifest(pool)
    if int(pool_m["num_rows"]) == 0:
        raise InputValueError(f"{pool}: the unlabelled pool is empty; there is nothing to pseudo-label")
    pl = cfg.pseudolabel
    threshold = float(pl.threshold) if pl.select == "threshold" else None
    ds = _scored(cfg, pool, teacher, "pseudo", threshold, columns=list(BASE_COLUMNS))
    if pl.select == "top_fraction":
        ds = top_fraction(ds, float(pl.top_fraction), len(teacher_classes(teacher)))
    names = teacher_classes(teacher)
    extra = {"key": key, "teacher": teacher["key"], "pool": identity.dataset_hash(pool), "pool_rows": int(pool_m["num_rows"]),
             "selection": selection(cfg), "stage": "pseudolabel"}
    m = write_dataset(ds, out, class_names=names, image_size=tuple(pool_m["image_size"]), channels=int(pool_m["channels"]),
                      config=to_dict(cfg.pseudolabel), extra=extra, columns=[*BASE_COLUMNS, "confidence", "teacher"])
    m["kept_share"] = m["num_rows"] / max(1, int(pool_m["num_rows"]))
    return m


# ----------------------------------------------------------------------------- students


def train_students(cfg: Config, train: str, val: str, pseudo: str, out_dir: str, *, synthetic: str | None = None,
                   ratio: float = 0.0, seeds=None, test: str | None = None) -> list[dict]:
    """One classifier per seed on labelled + pseudo-labelled (+ ``ratio`` x synthetic) rows.

    Same recipe and optimiser steps as real-only: the pseudo-labelled rows are the
    mixture's ``extra`` part, so an epoch is still ``|labelled|`` images. Keyed runs
    (``train.fit``): running again returns the recorded results.
    """
    from synthaug.classify.train import fit

    m = read_manifest(train)
    runs = []
    for seed in (cfg.classify.seeds if seeds is None else seeds):
        spec = plan_mixture(str(train), synthetic, ratio if synthetic else 0.0, int(seed), extra=str(pseudo))
        tag = f"pl-r{ratio:g}" if synthetic else "pl"
        r = fit(cfg.classify, spec, str(val), seed=int(seed), out_dir=out_dir, name=f"{tag}-seed{seed}",
                class_names=m["class_names"], in_chans=int(m["channels"]), ray_cfg=cfg.ray, test_dir=test)
        runs.append({**r, "seed": int(seed)})
    return runs


def real_only_runs(cfg: Config, train: str, val: str, out_dir: str, seeds=None, test: str | None = None) -> list[dict]:
    """Real-only runs per seed, as ``synthaug classify --ratio 0`` names and keys them (reused when recorded)."""
    from synthaug.classify.train import fit

    m = read_manifest(train)
    runs = []
    for seed in (cfg.classify.seeds if seeds is None else seeds):
        r = fit(cfg.classify, plan_mixture(str(train), None, 0.0, int(seed)), str(val), seed=int(seed), out_dir=out_dir,
                name=teacher_name(seed), class_names=m["class_names"], in_chans=int(m["channels"]), ray_cfg=cfg.ray,
                test_dir=test)
        runs.append({**r, "seed": int(seed)})
    return runs


# ----------------------------------------------------------------------------- filtering


def filter_key(cfg: Config, teacher: dict, synthetic: str) -> str:
    return identity.artifact_key("filter", {"tau": float(cfg.filter.tau)},
                                 {"teacher": teacher["key"], "synthetic": identity.dataset_hash(synthetic)})


def filter_synthetic(cfg: Config, teacher: dict, synthetic: str, out: str) -> dict:
    """Keep the rows of ``synthetic`` whose intended class gets teacher probability >= ``filter.tau``.

    Writes a keyed contract dataset at ``out`` (reused when complete with the same key);
    its manifest holds ``kept_per_class`` ({class: share kept}) and ``kept_share``.
    """
    key = filter_key(cfg, teacher, synthetic)
    done = identity.reuse(out, key, "filter", "the filtered set")
    if done is not None:
        return done
    syn_m = read_manifest(synthetic)
    if list(syn_m["class_names"]) != teacher_classes(teacher):
        raise InputValueError(f"{synthetic}: class names {list(syn_m['class_names'])} differ from the teacher's "
                              f"{teacher_classes(teacher)}")
    ds = _scored(cfg, synthetic, teacher, "filter", float(cfg.filter.tau))
    before = {n: int(c) for n, c in syn_m["counts"].items()}
    extra = {"key": key, "teacher": teacher["key"], "synthetic": identity.dataset_hash(synthetic), "stage": "filter",
             "tau": float(cfg.filter.tau), "counts_before": before,
             **{k: syn_m[k] for k in ("sample", "generator") if k in syn_m}}
    m = write_dataset(ds, out, class_names=list(syn_m["class_names"]), image_size=tuple(syn_m["image_size"]),
                      channels=int(syn_m["channels"]), config={"filter": to_dict(cfg.filter)}, extra=extra,
                      columns=[*(c for c in syn_m.get("columns", BASE_COLUMNS) if c not in ("teacher_prob", "teacher")),
                               "teacher_prob", "teacher"])
    return m


def kept_per_class(manifest: dict) -> dict[str, float]:
    """{class: kept / before} of a filtered set's manifest (NaN for a class with no rows before)."""
    before = manifest.get("counts_before", {})
    return {n: (manifest["counts"].get(n, 0) / before[n]) if before.get(n) else float("nan") for n in manifest["class_names"]}
