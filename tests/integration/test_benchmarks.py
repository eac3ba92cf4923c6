"""Every script in benchmarks/ starts: each runs end to end at its smallest size, into a
temporary folder (or, where a run needs what a test cannot have, a CUDA GPU, prints its help).
These are the scripts behind the README's tables; a refactor that breaks one fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main
from tests.conftest import ROOT, subprocess_env, write_corpus

pytestmark = pytest.mark.slow
BENCHMARKS = ROOT / "benchmarks"
TINY_LM = (
    "model.n_layers=1 model.d_model=32 model.n_heads=2 model.d_ff=64 model.adaptive_cutoffs=[100] "
    "data.tokens_per_sample=64 train.batch_size=2 train.max_updates=2 train.validate_interval=2 "
    "train.tensorboard=false train.log_interval=1"
)


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`benchmarks/SCRIPT ARGS` with the repository's sbtrain and python, `env` added."""
    bin_dir = Path(sys.executable).parent
    full_env = {**subprocess_env(), "SBTRAIN": str(bin_dir / "sbtrain"), "PYTHON": sys.executable}
    full_env["PATH"] = f"{bin_dir}{os.pathsep}{full_env.get('PATH', '')}"
    command = ["bash", str(BENCHMARKS / script), *args]
    if script.endswith(".py"):
        command = [sys.executable, str(BENCHMARKS / script), *args]
    result = subprocess.run(
        command, env={**full_env, **env}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
    return result


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def wiki_like(tmp_path_factory) -> Path:
    """A small WikiText-like corpus preprocessed with recipes/wiki-leads.yaml."""
    root = tmp_path_factory.mktemp("wiki")
    raw, data = write_corpus(root / "raw"), root / "bin"
    recipe = str(ROOT / "recipes" / "wiki-leads.yaml")
    assert main(["preprocess", recipe, f"data.raw={raw}", f"data.dir={data}"]) == 0
    return data


def test_every_script_is_covered_here():
    covered = {
        "allocator.sh",
        "copy-demo.sh",
        "cpu.sh",
        "features.sh",
        "features_dropin.py",
        "gpu.sh",
        "hf-dropin.sh",
        "length-generalisation.sh",
        "length_generalisation.py",
        "lra-cpu.sh",
        "merge_train.py",
        "parallel.sh",
        "recall.sh",
        "wiki-leads.sh",
        "wiki-leads-seeds.sh",
    }
    scripts = {p.name for p in BENCHMARKS.iterdir() if p.is_file() and p.suffix in (".sh", ".py")}
    assert scripts == covered


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.sh")))
def test_every_shell_script_prints_its_help(script):
    text = run(script, "--help").stdout
    assert "benchmarks/" in text and "set -" not in text


def test_gpu_sh_refuses_without_a_gpu_in_one_line(tmp_path):
    env = {**subprocess_env(), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode == 0:
        pytest.skip("a CUDA GPU is here: gpu.sh ran (minutes); run it by hand")  # not on CPU
    assert result.returncode == 2 and "sees no CUDA GPU" in result.stderr


def test_copy_demo(tmp_path):
    extra = (
        "copy.length=8 copy.n_symbols=8 copy.train_size=16 copy.valid_size=8 "
        "copy.test_size=8 train.batch_size=8 train.max_epochs=1 train.log_interval=1"
    )
    out = tmp_path / "copy.jsonl"
    run("copy-demo.sh", ONLY="^(full|scatterbrain)$", EXTRA=extra, RUNS=str(tmp_path), OUT=str(out))
    rows = jsonl(out)
    assert [r["name"] for r in rows] == ["scatterbrain", "full"]
    assert all(r["tokens"] == 8 * 8 and 0 <= r["accuracy"] <= 1 for r in rows)


def test_cpu_sh_and_merge_train(tmp_path):
    run("cpu.sh", SMOKE="1", OUT_DIR=str(tmp_path))
    merged = json.loads((tmp_path / "train-wt103-long-cpu.json").read_text())
    assert sorted({row["length"] for row in merged["rows"]}) == [32, 64, 128, 256, 512]
    for name in ("attention", "approx", "generate", "preprocess", "train-wt103-checkpointing"):
        assert json.loads((tmp_path / f"{name}-cpu.json").read_text())["rows"]


def test_features_sh_and_features_dropin(tmp_path, wiki_like):
    run(
        "features.sh",
        DATA=str(wiki_like),
        RUNS=str(tmp_path),
        OUT_DIR=str(tmp_path),
        DRAWS="1",
        EXTRA=TINY_LM,
    )
    result = json.loads((tmp_path / "features-dropin-cpu.json").read_text())
    assert {row["label"] for row in result["rows"]} >= {"full", "local 64"}
    assert json.loads((tmp_path / "approx-checkpoint-cpu.json").read_text())["rows"]


def test_wiki_leads_sh(tmp_path, wiki_like):
    run(
        "wiki-leads.sh",
        DATA=str(wiki_like),
        RUNS=str(tmp_path),
        OUT_DIR=str(tmp_path),
        EXTRA=TINY_LM,
    )
    for study in ("train", "dropin"):
        rows = jsonl(tmp_path / f"wiki-leads-{study}-cpu.jsonl")
        assert [r["name"] for r in rows] == ["full", "scatterbrain", "performer", "local", "lsh"]


def test_wiki_leads_seeds_sh(tmp_path, wiki_like):
    out = tmp_path / "seeds.jsonl"
    run(
        "wiki-leads-seeds.sh",
        "2",
        DATA=str(wiki_like),
        RUNS=str(tmp_path),
        OUT=str(out),
        SEEDS="1",
        ONLY="^(full|32/32|scatterbrain redraw 100)$",
        EXTRA=TINY_LM,
    )
    rows = jsonl(out)
    assert [(r["study"], r["name"]) for r in rows] == [
        ("train", "full"),
        ("dropin", "full"),
        ("budget", "32/32"),
        ("redraw", "scatterbrain redraw 100"),
    ]
    assert (tmp_path / "seeds.md").is_file()


def test_length_generalisation_sh_and_its_table(tmp_path, wiki_like):
    out = tmp_path / "lg.jsonl"
    run(
        "length-generalisation.sh",
        "2",
        DATA=str(wiki_like),
        RUNS=str(tmp_path),
        OUT=str(out),
        KINDS="scatterbrain",
        POSITIONS="rope",
        LENGTHS="64 128",
        BUCKET="32",
        EXTRA=TINY_LM,
    )
    assert [r["tokens_per_sample"] for r in jsonl(out)] == [64, 128]
    assert (tmp_path / "lg.png").is_file()


def test_hf_dropin_sh(tmp_path, wiki_like):
    pytest.importorskip("transformers")  # the hf extra: `make test` installs it
    save = tmp_path / "run"
    args = [
        "train",
        str(ROOT / "recipes" / "wiki-leads.yaml"),
        f"data.dir={wiki_like}",
        f"train.save_dir={save}",
        *TINY_LM.split(),
    ]
    assert main(args) == 0
    out = tmp_path / "hf.jsonl"
    run(
        "hf-dropin.sh", str(save / "checkpoint_best.pt"), str(wiki_like), str(out), ONLY="^$|^local"
    )
    rows = jsonl(out)
    assert len(rows) == 2 and all(r["rel_diff"] < 1e-4 for r in rows)


def test_lra_cpu_sh(tmp_path):
    out = tmp_path / "lra.jsonl"
    tiny = (
        "listops.train=64 listops.valid=16 listops.test=16 listops.min_tokens=8 "
        "listops.max_tokens=32 listops.max_depth=3"
    )
    run(
        "lra-cpu.sh",
        TASKS="listops",
        KINDS="full",
        SEEDS="1",
        UPDATES="2",
        OUT=str(out),
        RUNS=str(tmp_path),
        DATA=str(tmp_path / "data"),
        PREPROCESS=tiny,
        EXTRA="train.batch_size=8 model.d_model=32 model.d_ff=32",
    )
    (row,) = jsonl(out)
    assert row["study"] == "listops" and row["name"] == "full" and row["examples"] == 16


def test_recall_sh(tmp_path):
    out = tmp_path / "results"
    run(
        "recall.sh",
        SMOKE="1",
        RUNS=str(tmp_path / "runs"),
        DATA=str(tmp_path / "data"),
        OUT_DIR=str(out),
        KINDS="local scatterbrain",
        LENGTHS="64",
    )
    sweep = json.loads((out / "recall-dropin-64-cpu.json").read_text())
    swapped = {(r["kind"], r["budget"]) for r in sweep["rows"]}
    assert {("local", 4), ("local", 8), ("scatterbrain", 4), ("scatterbrain", 8)} <= swapped
    mechanism = jsonl(out / "recall-mechanism-cpu.jsonl")
    assert [r["kind"] for r in mechanism] == ["local", "lsh", "scatterbrain", "scatterbrain-lsh"]
    trained = jsonl(out / "recall-train-cpu.jsonl")
    assert [(r["name"], r["seed"]) for r in trained] == [("local", 1), ("scatterbrain", 1)]
    assert all(0 <= r["accuracy"] <= 1 for r in trained)
    tasks = jsonl(out / "recall-tasks-cpu.jsonl")
    assert [(r["study"], r["name"]) for r in tasks] == [
        ("selective-copy-cpu", "local"),
        ("selective-copy-cpu", "scatterbrain"),
        ("passkey-cpu", "local"),
        ("passkey-cpu", "scatterbrain"),
    ]
    assert "accuracy" in (out / "recall-train-cpu.md").read_text()


def test_parallel_sh(tmp_path):
    run("parallel.sh", SMOKE="1", OUT_DIR=str(tmp_path))
    cp = [r for name in ("parallel-cp-cpu.json", "parallel-cp-full-cpu.json")
          for r in json.loads((tmp_path / name).read_text())["rows"]]  # fmt: skip
    assert all(r["peak_since_warmup"] and r["sent_bytes_per_step"] == r["sent_bytes_formula"]
               for r in cp)  # fmt: skip
    assert sorted((r["attention"], r["context_parallel"]) for r in cp) == [
        ("full", 1),
        ("full", 2),
        ("scatterbrain", 1),
        ("scatterbrain", 2),
    ]
    activations = {(r["attention"], r["context_parallel"]): r["activation_mib"] for r in cp}
    assert min(activations.values()) > 0
    assert activations["scatterbrain", 2] < activations["scatterbrain", 1]  # half the tokens
    for name in ("ddp", "fsdp"):
        (row,) = json.loads((tmp_path / f"parallel-{name}-cpu.json").read_text())["rows"]
        assert row["processes"] == 2 and row["parallel"] == name
    sent = json.loads((tmp_path / "parallel-bytes.json").read_text())["rows"]
    full = [r["sent_bytes_per_step"] for r in sent if r["attention"] == "full"]
    flat = {r["sent_bytes_per_step"] for r in sent if r["attention"] == "scatterbrain"}
    assert full == sorted(full) and full[-1] == 8 * full[0] and len(flat) == 1


def test_allocator_sh(tmp_path):
    run("allocator.sh", SMOKE="1", OUT_DIR=str(tmp_path), ALLOCATORS="glibc")
    rows = json.loads((tmp_path / "allocator-cpu.json").read_text())["rows"]
    whole = json.loads((tmp_path / "allocator-whole-cpu.json").read_text())["rows"]
    assert len(rows) == 2 * 3 and len(whole) == 2  # slice: 2 models x 3 lengths; whole: 2
    assert {r["allocator"] for r in rows + whole} == {"glibc"}
    assert all(r["minor_faults"] > 0 and r["sys_s"] >= 0 for r in rows + whole)
    (steps,) = json.loads((tmp_path / "allocator-steps-cpu.json").read_text())["rows"][:1]
    assert len(steps["rss_mib_after_steps"]) == 3
