"""synthaug.malloc: trimming returns a fragmented heap's free pages to the OS; the interval is honoured."""

from __future__ import annotations

import pytest

from synthaug import malloc


def _private_mb() -> float:
    import psutil

    m = psutil.Process().memory_info()
    return (m.rss - m.shared) / 2**20


@pytest.mark.skipif(malloc._load() is False, reason="not glibc")
def test_trim_returns_the_free_pages_of_a_fragmented_heap():
    # 150k buffers of 2 KiB (above pymalloc's 512 B: glibc's heap, below its mmap threshold),
    # then keep one in 50: the heap cannot shrink from its top, the free pages sit in holes.
    bufs = [bytearray(2048) for _ in range(150_000)]
    kept = bufs[::50]
    del bufs
    before = _private_mb()
    assert malloc.trim()
    after = _private_mb()
    assert before - after > 100, (before, after)  # ~290 MB were freed into holes
    assert len(kept) == 3000 and all(len(b) == 2048 for b in kept)  # live buffers untouched


def test_trimmer_calls_trim_every_n_ticks(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc, "trim", lambda: calls.append(1) or True)
    t = malloc.Trimmer(4)
    for _ in range(10):
        t.tick()
    assert len(calls) == 2
    off = malloc.Trimmer(0)  # SYNTHAUG_MALLOC_TRIM_EVERY=0: never
    for _ in range(10):
        off.tick()
    assert len(calls) == 2


def test_bad_interval_is_a_one_line_error_before_any_work(monkeypatch, tmp_path):
    from synthaug.cli import main

    monkeypatch.setenv(malloc.TRIM_ENV, "often")
    with pytest.raises(ValueError, match="SYNTHAUG_MALLOC_TRIM_EVERY='often'"):
        malloc.Trimmer()
    monkeypatch.setenv(malloc.TRIM_ENV, "-1")
    with pytest.raises(ValueError, match="integer >= 0"):
        malloc.interval()
    # Through the CLI: exit code 2 and one line naming the variable, before ingest writes anything.
    out = tmp_path / "runs"
    assert main(["ingest", "--config", "jobs/configs/tiny.yaml", f"work_dir={out}"]) == 2
    assert not out.exists() or not any(out.rglob("manifest.json"))
    monkeypatch.setenv(malloc.TRIM_ENV, "0")
    assert malloc.interval() == 0
