"""Pathfinder (Linsley et al. 2018, the Long Range Arena's 32x32 variant, made here): does one
path join the two round markers?

Each image holds two main paths of `segments` straight pieces of `segment_length` pixels, each
turning by at most `max_turn` radians from the last, plus `distractors` shorter paths without
markers. Label 1: the markers sit on both ends of the first main path; label 0: one on an end
of each main path. Paths are drawn 1 pixel wide, 8-connected, at grey level 255 on black, and
no pixel of one path (markers included) is next to a pixel of another (8-neighbourhood): the
label is exactly "are the markers in one 8-connected bright component", which the tests
check from the pixels. Difficulty grows with `segments` (longer paths to follow).

Chunks of `chunk` images are drawn from their own random streams (seed, split, chunk number),
so the output does not depend on the number of worker processes. Labels are balanced in every
chunk (a shuffled half-and-half), so exactly in every split when `chunk` is even.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sbtrain.config import Section, opt
from sbtrain.lra.format import Examples, SplitStats, make_meta, write_meta, write_split
from sbtrain.staging import worker_map

SPLITS = ("train", "valid", "test")
PATH_GREY = 255
ATTEMPTS = 10  # tries of one piece's turn before the path is started again
PATH_TRIES = 100  # tries of one path before the whole image is started again


@dataclass(frozen=True)
class PathfinderConfig(Section):
    """What to generate (sizes: the Long Range Arena's 200,000 images cut 80/10/10); a recipe's
    `pathfinder:`."""

    train: int = opt(160_000, "images in train (LRA: 160,000)", "non-negative")
    valid: int = opt(20_000, "images in valid (LRA: 20,000)", "non-negative")
    test: int = opt(20_000, "images in test (LRA: 20,000)", "non-negative")
    size: int = opt(32, "image side in pixels, size**2 tokens of grey levels (LRA: 32)")
    segments: int = opt(8, "pieces of each main path: the difficulty", "positive")
    segment_length: float = opt(2.5, "pixels per piece", "positive")
    max_turn: float = opt(0.7, "radians, largest change of direction between pieces")
    distractors: int = opt(2, "paths without markers", "non-negative")
    distractor_segments: int = opt(5, "pieces of each distractor", "positive")
    marker_radius: float = opt(2.0, "pixels this close to a path's end form its marker", "positive")
    seed: int = opt(0, "generator seed: the same images whatever the number of workers")
    chunk: int = opt(200, "images per unit of work (even: labels exactly balanced)", "positive")

    def contradictions(self):
        if self.size < 8:
            yield "size", f"must be at least 8, got {self.size}"


def prepare(
    folder: str | Path, config: PathfinderConfig, workers: int = 1
) -> dict[str, SplitStats]:
    """Generate Pathfinder and write train/valid/test and meta.json into `folder`."""

    stats = {}
    with worker_map(workers) as imap:
        for split in SPLITS:
            count = getattr(config, split)
            if count:
                jobs = [
                    (config, split, a, min(a + config.chunk, count))
                    for a in range(0, count, config.chunk)
                ]
                batches = (_batch(result) for result in imap(_chunk, jobs))
                stats[split] = write_split(folder, split, batches, "uint8")
    meta = make_meta(
        "pathfinder",
        "pixels",
        256,
        2,
        list(stats),
        shape=[config.size] * 2,
        source={"generator": "pathfinder", **asdict(config)},
    )
    write_meta(folder, meta)
    return stats


def generate(config: PathfinderConfig, split: str, start: int, stop: int) -> list[tuple]:
    """Images start..stop-1 of `split` as (pixels (size*size,) uint8, label, markers) with
    markers the two ((y, x), (y, x)) centres; images of one chunk are drawn together."""
    out = []
    for a in range(start - start % config.chunk, stop, config.chunk):
        b = min(a + config.chunk, getattr(config, split))
        chunk = _chunk((config, split, a, b))
        out += chunk[max(start - a, 0) : stop - a]
    return out


def _batch(chunk: list[tuple]) -> Examples:
    return Examples([image for image, _, _ in chunk], [label for _, label, _ in chunk])


def _chunk(job: tuple[PathfinderConfig, str, int, int]) -> list[tuple]:
    config, split, start, stop = job
    rng = random.Random(f"pathfinder:{config.seed}:{split}:{start}")
    labels = [i % 2 for i in range(stop - start)]
    rng.shuffle(labels)
    return [_image(rng, config, label) for label in labels]


def _image(rng: random.Random, config: PathfinderConfig, label: int) -> tuple:
    """One image with `label`: (pixels, label, marker centres)."""
    size = config.size
    disk = _disk(config.marker_radius)
    while True:
        taken = np.zeros((size, size), bool)  # the paths so far, and room for the markers
        lengths = [config.segments] * 2 + [config.distractor_segments] * config.distractors
        paths = []
        for i, segments in enumerate(lengths):
            blocked = _dilate(taken).reshape(-1).tobytes()
            for _ in range(PATH_TRIES):
                path = _path(rng, config, segments, blocked, disk if i < 2 else None)
                if path is not None:
                    break
            else:
                break  # no room left for this path: start the image again
            paths.append(path)
            pixels, ends = path
            taken.reshape(-1)[pixels] = True
            for ey, ex in ends if i < 2 else ():
                taken[ey + disk[0], ex + disk[1]] = True
        if len(paths) == len(lengths):
            break
    (_, ends_a), (_, ends_b) = paths[0], paths[1]
    flip = rng.random() < 0.5
    first = ends_a[flip]
    second = ends_a[not flip] if label else ends_b[rng.random() < 0.5]
    image = np.zeros((size, size), np.uint8)
    for pixels, _ in paths:
        image.reshape(-1)[pixels] = PATH_GREY
    for ey, ex in (first, second):
        image[ey + disk[0], ex + disk[1]] = PATH_GREY
    return image.reshape(-1), label, (first, second)


def _path(rng: random.Random, config: PathfinderConfig, segments: int, blocked: bytes, disk):
    """A path clear of `blocked` (flat, nonzero = taken), with room for a marker `disk` at
    both ends when given: (its flat pixel indices, its two ends (y, x)), or None when stuck."""
    size, pad = config.size, math.ceil(config.marker_radius)
    y, x = rng.uniform(pad, size - 1 - pad), rng.uniform(pad, size - 1 - pad)
    angle = rng.uniform(0, 2 * math.pi)
    start = (int(y + 0.5), int(x + 0.5))
    pixels = [start[0] * size + start[1]]
    if blocked[pixels[0]]:
        return None
    for _ in range(segments):
        for _ in range(ATTEMPTS):
            turn = angle + rng.uniform(-config.max_turn, config.max_turn)
            ny = y + config.segment_length * math.sin(turn)
            nx = x + config.segment_length * math.cos(turn)
            if 0 <= ny <= size - 1 and 0 <= nx <= size - 1:
                piece = _segment(y, x, ny, nx, size)
                if not any(blocked[p] for p in piece):
                    break
        else:
            return None
        pixels += piece
        y, x, angle = ny, nx, turn
    ends = [start, (int(y + 0.5), int(x + 0.5))]
    if disk is not None:
        for ey, ex in ends:
            if not (pad <= ey < size - pad and pad <= ex < size - pad):
                return None
            if any(blocked[(ey + dy) * size + ex + dx] for dy, dx in zip(*disk)):
                return None
    return pixels, ends


def _segment(y0: float, x0: float, y1: float, x1: float, size: int) -> list[int]:
    """Flat indices of a straight piece inside the image, sampled every <= 0.4 px so that
    consecutive pixels touch (8-neighbourhood)."""
    steps = max(1, math.ceil(math.hypot(y1 - y0, x1 - x0) / 0.4))
    dy, dx = (y1 - y0) / steps, (x1 - x0) / steps
    return [int(y0 + k * dy + 0.5) * size + int(x0 + k * dx + 0.5) for k in range(1, steps + 1)]


def _disk(radius: float) -> tuple[np.ndarray, np.ndarray]:
    r = math.ceil(radius)
    offsets = [
        (dy, dx)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
        if dy * dy + dx * dx <= radius * radius
    ]
    return np.array([o[0] for o in offsets]), np.array([o[1] for o in offsets])


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Pixels within one step (8-neighbourhood) of `mask`."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out
