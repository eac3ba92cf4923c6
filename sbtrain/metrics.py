"""Training metrics, under fairseq's names, to a progress line, `train.jsonl` and TensorBoard.

`loss` is in bits (base 2, as fairseq logs it) and `ppl = 2 ** loss`; `nll_nats` is the same
loss in nats. wps: target tokens per second; ups: updates per second; wpb: target tokens per
update; bsz: sequences per update; gnorm: gradient norm before clipping; clip: % of updates
clipped; loss_scale: fp16 loss scale; wall: seconds since the start of this process.
Tasks that score examples (classifiers) log eps, examples per second, instead of wps and wpb
(their bsz is the examples per update).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from sbtrain.staging import disk_error

LN2 = math.log(2)


class Interval:
    """Sums over the updates since the last log line (saved in checkpoints, so a resumed run
    logs the same averages as one that was never stopped)."""

    SUMS = ("nll", "tokens", "sequences", "updates", "gnorm", "clipped")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.nll, self.tokens, self.sequences, self.updates = 0.0, 0, 0, 0
        self.gnorm, self.clipped = 0.0, 0
        self.start = time.perf_counter()

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.SUMS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.SUMS:
            setattr(self, name, state[name])

    def add(self, nll: float, tokens: int, sequences: int, gnorm: float, clipped: bool) -> None:
        self.nll += nll
        self.tokens += tokens
        self.sequences += sequences
        self.updates += 1
        self.gnorm += gnorm
        self.clipped += int(clipped)

    def summary(self, unit: str = "tokens") -> dict[str, float]:
        """The interval's averages; `unit` (the task's: tokens or examples) names the rates."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        n = max(self.updates, 1)
        loss_nats = self.nll / max(self.tokens, 1)
        loss = {"loss": loss_nats / LN2, "nll_nats": loss_nats,
                "ppl": math.exp(min(loss_nats, 700.0))}  # fmt: skip
        if unit == "examples":
            rates = {"eps": self.tokens / seconds, "ups": self.updates / seconds}
        else:
            rates = {"wps": self.tokens / seconds, "ups": self.updates / seconds,
                     "wpb": self.tokens / n}  # fmt: skip
        return {**loss, **rates, "bsz": self.sequences / n, "gnorm": self.gnorm / n,
                "clip": 100.0 * self.clipped / n}  # fmt: skip


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated GPU memory so far, in GB (None on CPU, where torch does not track it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return None


def truncate_log(path: Path, last_update: int) -> None:
    """Drop records after `last_update` (logged by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["update"] <= last_update:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by a kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


class Logger:
    """Records of logged updates to {split}.jsonl, TensorBoard and the console (main process)."""

    def __init__(self, save_dir: Path, tensorboard: bool, total_updates: int, resumed_at: int):
        self.save_dir = Path(save_dir)
        self.files = {}
        for name in ("train", "valid", "overflow"):
            truncate_log(self.save_dir / f"{name}.jsonl", resumed_at)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            # purge events a killed run logged after its last checkpoint
            self.writer = SummaryWriter(str(self.save_dir / "tb"), purge_step=resumed_at + 1)
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_updates, dynamic_ncols=True, leave=False)

    def log(self, record: dict, prefix: str = "train") -> None:
        """Append a record (must hold `update`) to {prefix}.jsonl, TensorBoard and the console."""
        record = {**record, "wall": round(time.perf_counter() - self.start, 3)}
        path = self.save_dir / f"{prefix}.jsonl"
        try:
            if prefix not in self.files:
                self.files[prefix] = open(path, "a", encoding="utf-8")  # noqa: SIM115
            self.files[prefix].write(json.dumps(record) + "\n")
            self.files[prefix].flush()
        except OSError as e:
            advice = "free space and rerun the same command: it resumes from the last checkpoint"
            raise disk_error(e, path, advice) from None
        step = record["update"]
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("update", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
        line = format_line(record)
        if self.bar is not None:
            self.bar.n = step if prefix == "train" else self.bar.n
            self.bar.set_postfix_str(line, refresh=True)
            if prefix != "train":
                self.bar.write(f"{prefix} | {line}")
        else:
            print(f"{prefix} | {line}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        for f in self.files.values():
            f.close()


def format_line(record: dict) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        parts.append(f"{key} {value}")
    return " | ".join(parts)
