"""Mean and standard deviation over seeds of the JSON lines a multi-seed study writes.

    python -m sbtrain.bench.seeds benchmarks/results/wiki-leads-seeds-cpu.jsonl [--out T.md]
    sbtrain eval-ppl RUN/checkpoint_best.pt --json \
      | python -m sbtrain.bench.seeds record RUN study=train name=full seed=1 >> S.jsonl

Each line is one evaluated run: `study` (e.g. train, dropin, budget), `name` (the kind or the
split of the budget), `seed`, and the `eval-ppl --json` figures (`ppl`, `loss_nats`, ...). Runs are
grouped by (study, name) in first-seen order; the standard deviation is the sample one (n - 1),
so a group of one run has none. Runs that carry a `valid_curve` ([update, loss, ...] per
validation) also get `late_drop`: how much lower (in %) the final validation loss is than the
last one at or before 80% of the updates — a run whose loss has flattened has a late drop near 0.
Accuracy (`--metric accuracy`) is shown in percent.

`record` writes one such line (what the benchmark scripts append): the key=value fields given
(text, except `seed`: an integer); then, from the run folder, `updates` and `train_seconds` (at
its last validation) and `valid_curve` ([update, loss in bits] per validation, plus accuracy
where the run logged it); then eval-ppl's JSON, read from stdin.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from sbtrain.errors import UserError
from sbtrain.staging import write_file, write_json


def read_runs(paths: list[str | Path]) -> list[dict]:
    """Every JSON line of `paths` (blank lines skipped)."""
    runs = []
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise UserError(f"{path}: cannot read it ({e.strerror})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{number}: not a JSON line") from None
    return runs


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))


def late_drop(curve: list[list[float]], fraction: float = 0.8) -> float | None:
    """% by which the last validation loss is below the last one at or before `fraction` of the
    final update (None without a point there, or when that loss is 0)."""
    final_update, final_loss = curve[-1][0], curve[-1][1]
    earlier = [point[1] for point in curve if point[0] <= fraction * final_update]
    if not earlier or earlier[-1] == 0:
        return None
    return 100.0 * (earlier[-1] - final_loss) / earlier[-1]


def record(evaluation: dict, run: str | Path, fields: dict) -> dict:
    """One study line: `fields`, the run's updates, training seconds and validation curve (from
    `run`/valid.jsonl), then `evaluation` (eval-ppl's figures)."""
    valid = read_runs([Path(run) / "valid.jsonl"])
    if not valid:
        raise UserError(f"{run}/valid.jsonl: no validation was logged")
    try:
        curve = [
            [v["update"], v["loss"]] + ([v["accuracy"]] if "accuracy" in v else []) for v in valid
        ]
        updates, seconds = valid[-1]["update"], valid[-1]["wall"]
    except KeyError as e:
        what = f"a validation record has no {e.args[0]!r} field"
        raise UserError(f"{run}/valid.jsonl: {what}") from None
    return {
        **fields,
        "updates": updates,
        "train_seconds": seconds,
        "valid_curve": curve,
        **evaluation,
    }


def _field(text: str) -> tuple[str, str | int]:
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise UserError(f"{text!r}: fields are key=value")
    if key != "seed":
        return key, value
    try:
        return key, int(value)
    except ValueError:
        raise UserError(f"seed={value!r}: not an integer") from None


def record_main(argv: list[str]) -> int:
    prog = "python -m sbtrain.bench.seeds record"
    if not argv:
        print(f"usage: {prog} RUN key=value ... < eval-ppl.json", file=sys.stderr)
        return 2
    try:
        fields = dict(_field(text) for text in argv[1:])
        try:
            evaluation = json.loads(sys.stdin.read())
        except json.JSONDecodeError:
            raise UserError("stdin: not eval-ppl's JSON") from None
        line = record(evaluation, argv[0], fields)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(line))
    return 0


def first_reaching(curve: list[list[float]], level: float) -> int | None:
    """The first validation update whose accuracy (a curve point's third value) is >= level."""
    return next((p[0] for p in curve if len(p) > 2 and p[2] >= level), None)


def summarise(runs: list[dict], metric: str = "ppl", reach: float | None = None) -> list[dict]:
    """One row per (study, name): n, the seeds, and mean / std of `metric` and of loss_nats;
    with `reach`, each run's first validation update whose accuracy reaches it (or None)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if "name" not in run:
            raise UserError("a run has no 'name' field")
        groups.setdefault((run.get("study", ""), run["name"]), []).append(run)
    rows = []
    for (study, name), members in groups.items():
        row = {"study": study, "name": name, "n": len(members)}
        row["seeds"] = ",".join(str(m.get("seed", "?")) for m in members)
        for key in (metric, "loss_nats"):
            if any(key not in m for m in members):
                raise UserError(f"a run has no {key!r} field")
            mean, std = mean_std([float(m[key]) for m in members])
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        if reach is not None:
            row["reaches"] = [first_reaching(m.get("valid_curve", []), reach) for m in members]
        drops = [late_drop(m["valid_curve"]) for m in members if m.get("valid_curve")]
        drops = [d for d in drops if d is not None]
        if drops:
            row["late_drop_mean"] = sum(drops) / len(drops)
        rows.append(row)
    return rows


def markdown(rows: list[dict], metric: str = "ppl", reach: float | None = None) -> str:
    """The rows as a markdown table: study, name, runs, metric as mean ± std (and the mean late
    drop of the validation loss when the runs carry their curves; with `reach`, the update each
    run first reached that accuracy, "-" for never)."""
    curves = any("late_drop_mean" in r for r in rows)
    scale, label = (100.0, "accuracy %") if metric == "accuracy" else (1.0, metric)
    reached = f" reaches {100 * reach:g}% at update |" if reach is not None else ""
    lines = [
        f"| study | name | runs | {label} (mean ± std) |"
        + (" late drop |" if curves else "")
        + reached,
        "|---|---|---:|---:|" + ("---:|" if curves else "") + ("---|" if reach else ""),
    ]
    for r in rows:
        mean, std = r[f"{metric}_mean"] * scale, r[f"{metric}_std"]
        spread = f"{mean:.2f} ± {std * scale:.2f}" if std is not None else f"{mean:.2f}"
        line = f"| {r['study']} | {r['name']} | {r['n']} | {spread} |"
        if curves:
            drop = r.get("late_drop_mean")
            line += f" {drop:.2f}% |" if drop is not None else " |"
        if reach is not None:
            line += " " + ", ".join("-" if u is None else str(u) for u in r["reaches"]) + " |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["record"]:
        return record_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m sbtrain.bench.seeds", description=__doc__)
    parser.add_argument("jsonl", nargs="+", help="JSON lines of evaluated runs")
    parser.add_argument("--metric", default="ppl", help="the figure to summarise (default: ppl)")
    parser.add_argument("--out", help="also write the markdown table here, and the rows as JSON")
    parser.add_argument(
        "--reach", type=float, help="also: the update each run reached this accuracy"
    )
    args = parser.parse_args(argv)
    try:
        rows = summarise(read_runs(args.jsonl), args.metric, args.reach)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    text = markdown(rows, args.metric, args.reach)
    print(text)
    if args.out:
        write_file(args.out, lambda f: f.write((text + "\n").encode()))
        write_json(Path(args.out).with_suffix(".json"), rows, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
