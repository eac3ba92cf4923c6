"""Benchmark of `sbtrain preprocess`: wall time, MB/s and peak memory on a generated corpus.

    from sbtrain import bench
from sbtrain.bench.preprocess import bench_preprocess
    bench_preprocess(megabytes=500, tokenizers=("word", "sentencepiece"), workers=2)

The corpus imitates WikiText's raw files: ` = Title = ` and ` = = Section = = ` headings, blank
lines, paragraphs of Zipf-distributed words (real function words at the top ranks, generated
words below, a few with accents). Each tokenizer runs as its own `python -m sbtrain preprocess`
process, so the numbers include start-up and worker processes; peak memory is the largest sum of
the RSS of that process and all its descendants, sampled every 0.1 s from /proc (Linux), and the
largest single-process peak the kernel recorded (wait4's ru_maxrss). CPU seconds (user + system,
workers included) and the load average before each run are reported too: on a machine shared
with other jobs, MB per CPU-second is the figure that does not depend on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sbtrain import bench

ROOT = Path(__file__).resolve().parents[2]
SPLIT_FRACTIONS = {"train": 0.98, "valid": 0.01, "test": 0.01}
VOCAB = 300_000
COMMON = (  # split where used
    "the , . of and in to a was @-@ 's is for on as with by he that at from his it an were are "
    "which this also be or had first one their its new after but who not they have ; her she two "
    "been other when there all % during into school time may years more most only over city some "
    "world would where later up such used many can state about national out known university"
)
SYLLABLES = (
    "ka ri to men sa lo ver an del mor tis qua ne bel ga stro pe lin dor fa che ru im ol za "
    "hen wi sto ber nu gal tra mi son ec cha vel ios ur pla dre"
)
ACCENTED = "éèüöñçåø"
SAMPLE_SECONDS = 0.1


def bench_preprocess(
    megabytes: float = 500,
    tokenizers: Sequence[str] = ("word", "sentencepiece"),
    workers: int = 2,
    work_dir: str | Path | None = None,
    out: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Generate a `megabytes` corpus, preprocess it once per tokenizer; print and return JSON.

    `work_dir` holds the corpus and outputs (a temporary folder, removed afterwards, by
    default); `out` also writes the JSON there.
    """
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="bench-preprocess-") as tmp:
        raw = Path(tmp) / "raw"
        started = time.perf_counter()
        corpus_bytes = write_corpus(raw, megabytes, seed)
        print(f"| corpus: {corpus_bytes / 1e6:.1f} MB in {time.perf_counter() - started:.0f} s")
        runs = [
            _measure(raw, Path(tmp) / f"bin-{kind}", kind, workers, corpus_bytes)
            for kind in tokenizers
        ]
    settings = {"corpus_mb": round(corpus_bytes / 1e6, 1), "workers": workers}
    return bench.report("preprocess", runs, out, {"machine": bench.machine(), "settings": settings})


def write_corpus(folder: str | Path, megabytes: float, seed: int = 0) -> int:
    """Write wiki.{train,valid,test}.raw of `megabytes` MB in all (10^6 bytes); returns bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = _vocabulary(rng)
    cdf = np.cumsum(1.0 / np.arange(1, len(words) + 1))  # Zipf, exponent 1
    cdf /= cdf[-1]
    total = 0
    for split, fraction in SPLIT_FRACTIONS.items():
        budget = int(megabytes * 1e6 * fraction)
        with open(folder / f"wiki.{split}.raw", "w", encoding="utf-8", newline="\n") as f:
            written = 0
            while written < budget:
                text = _article(rng, words, cdf)
                f.write(text)
                written += len(text.encode("utf-8"))
        total += written
    return total


def _vocabulary(rng: np.random.Generator) -> np.ndarray:
    """COMMON words first, then distinct generated words: VOCAB words by rank."""
    words = dict.fromkeys(COMMON.split())
    syllables = SYLLABLES.split()
    while len(words) < VOCAB:
        word = "".join(rng.choice(syllables, size=rng.integers(1, 5)))
        if rng.random() < 0.15:
            word = word.capitalize()
        if rng.random() < 0.02:
            i = rng.integers(len(word))
            word = word[:i] + rng.choice(list(ACCENTED)) + word[i + 1 :]
        words[word] = None
    return np.array(list(words), dtype=object)


def _article(rng: np.random.Generator, words: np.ndarray, cdf: np.ndarray) -> str:
    """One article: title, then sections of paragraphs, blank lines between, as in WikiText."""
    n_paragraphs = int(rng.integers(3, 25))
    lengths = np.maximum(rng.exponential(110, size=n_paragraphs).astype(int), 5)
    ids = np.searchsorted(cdf, rng.random(int(lengths.sum()) + 40))
    text = words[ids].tolist()
    title = " ".join(w.capitalize() for w in text[-4 : -4 + int(rng.integers(1, 4))])
    lines = [" ", f" = {title} = ", " "]
    start = 0
    for i, length in enumerate(lengths):
        if i and rng.random() < 0.3:
            heading = " ".join(w.capitalize() for w in text[-8 : -8 + int(rng.integers(1, 4))])
            lines += [f" = = {heading} = = ", " "]
        lines += [" " + " ".join(text[start : start + length]) + " ", " "]
        start += length
    return "\n".join(lines) + "\n"


def _measure(raw: Path, dest: Path, kind: str, workers: int, corpus_bytes: int) -> dict:
    """Run one preprocess in a child process; wall time and peak memory of its process tree."""
    command = [
        sys.executable, "-m", "sbtrain", "preprocess", f"data.raw={raw}", f"data.dir={dest}",
        f"data.tokenizer={kind}", f"data.workers={workers}",
    ]  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_tree = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        peak_tree = max(peak_tree, _tree_rss(child.pid))
        time.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - started
    log = child.stdout.read().decode("utf-8", "replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"preprocess with {kind} failed:\n{log}")
    stats = json.loads((dest / "train.json").read_text())
    cpu_seconds = usage.ru_utime + usage.ru_stime  # the child and the workers it waited for
    return {
        "tokenizer": kind,
        "seconds": round(seconds, 2),
        "mb_per_s": round(corpus_bytes / 1e6 / seconds, 2),
        "cpu_seconds": round(cpu_seconds, 1),
        "mb_per_cpu_s": round(corpus_bytes / 1e6 / cpu_seconds, 2),
        "load_avg_before": round(load_before, 2),
        "peak_rss_tree_mb": round(peak_tree / 1e6, 1),
        "peak_rss_one_process_mb": round(usage.ru_maxrss * 1024 / 1e6, 1),  # ru_maxrss is in KiB
        "vocab_size": json.loads((dest / "meta.json").read_text())["vocab_size"],
        "train_tokens": stats["tokens"],
    }


def _tree_rss(root: int) -> int:
    """Bytes resident in process `root` and all its descendants (0 where /proc is missing)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError):
            continue
        total += resident_pages * os.sysconf("SC_PAGE_SIZE")
    return total


main = bench_preprocess  # `sbtrain bench preprocess` calls main(**its options)
