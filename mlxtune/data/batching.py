"""Examples -> micro-batches of numpy arrays. Framework-free.

Each example of n tokens gives n - 1 positions (inputs ids[:-1], targets ids[1:]). With packing,
first-fit-decreasing fills rows of `max_seq_len` positions with whole examples; a segment id per
position keeps attention inside its example (0 marks padding). Without packing, each example is
a row. Rows are sorted by length before they are cut into batches (whose order is then
shuffled), so a batch pads only to its own longest row. Either way
the plan of an epoch is a pure function of (seed, epoch): a run resumes by rebuilding it and
skipping to the saved position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..errors import DataError
from .encode import Encoded, encode
from .media import (
    AudioSpec,
    FixedImageSpec,
    ImageSpec,
    MediaItem,
    MediaPlan,
    USMAudioSpec,
    open_image,
    pool_index,
)
from .rows import Row

PAD_MULTIPLE = 32  # batch lengths round up to this, so a compiled step sees few shapes
AUDIO_FRAME_MULTIPLE = 96  # mel frames of a batch of clips round up to this (0.96 s)
SOFT_MULTIPLE = 64  # rows of precomputed soft tokens round up to this


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    skipped: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def line(self, name: str, max_seq_len: int) -> str:
        over = ""
        if self.truncated or self.skipped:
            over = f"; over max_seq_len {max_seq_len}: {self.truncated} truncated, "
            over += f"{self.skipped} skipped"
        return (
            f"{name}: {self.rows} rows, {self.tokens:,} tokens "
            f"({self.loss_tokens:,} with loss){over}"
        )


@dataclass(frozen=True)
class Dataset:
    examples: list[Encoded]
    stats: DataStats = field(default_factory=DataStats)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.array([len(e) - 1 for e in self.examples], dtype=np.int64)

    @cached_property
    def loss_counts(self) -> np.ndarray:
        """Target tokens of each example (what `collate` weights with 1)."""
        return np.array([int(e.loss[1:].sum()) for e in self.examples], dtype=np.int64)


def prepare(
    rows: list[Row],
    tokenizer,
    max_seq_len: int,
    loss_on: str = "assistant",
    overlong: str = "truncate",
    stop_ids: frozenset[int] = frozenset(),
    media: MediaPlan | None = None,
) -> Dataset:
    """Encode rows; rows over `max_seq_len` are truncated (never through an image or a clip) or
    skipped, and counted. Every picture is decoded once here (counting its tokens reads only its
    header), so a broken file stops the run before it starts, not mid-training."""
    stats = DataStats(rows=len(rows))
    examples = []
    for row in rows:
        ex = encode(row, tokenizer, loss_on, stop_ids, media)
        for item in ex.media:
            if item.kind == "image":
                open_image(item.path, item.where)
        if len(ex) > max_seq_len:
            if overlong == "skip":
                stats.skipped += 1
                continue
            stats.truncated += 1
            ex = ex.truncate(max_seq_len)
        if len(ex) < 2 or not ex.loss[1:].any():
            stats.skipped += 1  # nothing left to learn from (truncated away, or too short)
            continue
        examples.append(ex)
        stats.tokens += len(ex)
        stats.loss_tokens += int(ex.loss[1:].sum())
    if not examples:
        where = rows[0].where.rsplit(":", 1)[0] if rows else "data"
        raise DataError(f"{where}: no row has a target token within max_seq_len {max_seq_len}")
    return Dataset(examples, stats)


@dataclass(frozen=True)
class Batching:
    """How examples become micro-batches: rows of at most `max_seq_len` positions (several
    examples each with `packing`), cut into micro-batches of at most `rows` rows and at most
    `tokens` slots (rows x padded length, padding counted), whichever binds first; a batch
    always takes at least one row. `tokens` bounds a step's memory whatever the row lengths:
    rows of similar length share a batch, so short rows come many to a batch, long ones few."""

    max_seq_len: int
    packing: bool
    rows: int | None = None
    tokens: int | None = None
    ranks: int = 1  # data-parallel ranks that share each micro-batch (`shard`)

    @classmethod
    def of(cls, cfg, ranks: int = 1) -> Batching:
        """The config's batching over `ranks` data-parallel ranks: `train.batch_tokens` and
        `train.batch_size` are per rank, so the global micro-batch, planned as one process
        would plan it, holds `ranks` times as much. N ranks with budget B plan exactly the
        batches one process plans with budget N x B."""
        t = cfg.train
        rows = t.batch_size * ranks if t.batch_size else None
        tokens = t.batch_tokens * ranks if t.batch_tokens else None
        return cls(cfg.data.max_seq_len, cfg.data.packing, rows, tokens, ranks)

    def key(self) -> tuple:
        """What fixes the plan of every epoch (not how many ranks share it)."""
        return (self.max_seq_len, self.packing, self.rows, self.tokens)

    def padded(self, used: int) -> int:
        """The length a batch whose longest row holds `used` positions is padded to."""
        return padded_length(used, self.max_seq_len)

    def take(self, length: int) -> int:
        """Rows a batch padded to `length` takes."""
        n = max(1, self.tokens // length) if self.tokens else self.rows or 1
        return min(n, self.rows) if self.rows else n

    def cut(self, used: list[int]) -> list[int]:
        """Batch sizes for rows of these fills, sorted longest first."""
        sizes, i = [], 0
        while i < len(used):
            sizes.append(min(self.take(self.padded(used[i])), len(used) - i))
            i += sizes[-1]
        return sizes

    def slots(self, used: list[int]) -> int:
        """Row slots (padding included) of all batches of these fills."""
        used = sorted(used, reverse=True)
        total, i = 0, 0
        for n in self.cut(used):
            total += n * self.padded(used[i])
            i += n
        return total

    def most_tokens(self) -> int:
        """The most slots one rank's share of a micro-batch can hold (the memory plan's tokens
        per step): a global batch of n rows gives a rank at most ceil(n / ranks) of them."""
        lengths = {*range(PAD_MULTIPLE, self.max_seq_len, PAD_MULTIPLE), self.max_seq_len}
        return max(-(-self.take(n) // self.ranks) * n for n in lengths)


def padded_length(used: int, max_seq_len: int, multiple: int = PAD_MULTIPLE) -> int:
    """A batch's length: its longest row rounded up to `multiple`, at most max_seq_len."""
    return min(-(-max(used, 1) // multiple) * multiple, max_seq_len)


def plan_epoch(
    lengths: np.ndarray, batching: Batching, seed: int, epoch: int, shuffle: bool = True
) -> list[list[list[int]]]:
    """Micro-batches of rows of example indices: [[row, row, ...], ...], each row [i, j, ...]."""
    order = np.arange(len(lengths))
    rng = np.random.default_rng([seed, epoch])
    if shuffle:
        order = rng.permutation(order)  # ties in length fall in a new order each epoch
    order = order[np.argsort(-lengths[order], kind="stable")]
    cap = batching.max_seq_len
    rows = _first_fit(lengths, order, cap) if batching.packing else [[int(i)] for i in order]
    # Rows of similar fill share a batch, which pads only to its longest row.
    used = np.array([sum(int(lengths[i]) for i in row) for row in rows])
    at = np.argsort(-used, kind="stable")
    rows, used = [rows[i] for i in at], [min(int(used[i]), cap) for i in at]
    batches, i = [], 0
    for n in batching.cut(used):
        batches.append(rows[i : i + n])
        i += n
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _first_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """First fit: each example in `order` (longest first, for first-fit decreasing) goes in the
    first row with room for it, or opens a new row. A max-tree over the rows' free room finds
    that row in O(log n) steps (a linear scan took an hour per epoch at 1M examples)."""
    order = np.asarray(order).tolist()
    sizes = np.asarray(lengths)[order].tolist() if order else []
    leaves = 1 << max(len(order) - 1, 0).bit_length()  # at most one row per example
    room = [-(1 << 62)] * (2 * leaves)  # node k: the most room under it; rows not opened: none
    rows: list[list[int]] = []
    for i, n in zip(order, sizes, strict=True):
        if room[1] >= n:  # some row has room: go down to the leftmost one
            k = 1
            while k < leaves:
                k <<= 1
                if room[k] < n:
                    k += 1
            rows[k - leaves].append(i)
            room[k] -= n
        else:
            k = leaves + len(rows)
            rows.append([i])
            room[k] = capacity - n
        k >>= 1
        while k:  # up to the root, until a node's maximum no longer changes
            left, right = room[2 * k], room[2 * k + 1]
            most = left if left >= right else right
            if room[k] == most:
                break
            room[k] = most
            k >>= 1
    return rows


def shard(rows: list[list[int]], lengths: np.ndarray, rank: int, size: int) -> list[list[int]]:
    """The rows of one global micro-batch that data-parallel rank `rank` of `size` runs."""
    return split_rows(rows, lengths, size)[rank]


def split_rows(rows: list[list[int]], lengths: np.ndarray, size: int) -> list[list[list[int]]]:
    """One global micro-batch split across `size` data-parallel ranks.

    Every rank computes the same split from the same plan (no communication): rows, longest
    first, each go to the rank holding the fewest rows so far, then the fewest tokens, then the
    lowest rank. So each row is run by exactly one rank, the ranks' row counts differ by at
    most one (a rank's memory is bounded by its share of rows), and since a batch holds rows of
    similar length their tokens differ by at most one row's. A rank can get no row when the
    batch has fewer rows than ranks; it still takes part in the step with an empty share."""
    used = [sum(int(lengths[i]) for i in row) for row in rows]
    load = [(0, 0)] * size
    parts: list[list[list[int]]] = [[] for _ in range(size)]
    for r in sorted(range(len(rows)), key=lambda r: -used[r]):
        to = min(range(size), key=lambda k: (*load[k], k))
        load[to] = (load[to][0] + 1, load[to][1] + used[r])
        parts[to].append(rows[r])
    return parts


@dataclass(frozen=True)
class Batch:
    inputs: np.ndarray  # int32 [B, L]
    targets: np.ndarray  # int32 [B, L]
    weights: np.ndarray  # float32 [B, L]: 1 where the target carries loss
    segments: np.ndarray  # int32 [B, L]: example number within the row, 0 = padding
    placed: tuple[tuple[int, MediaItem], ...] = ()  # (flat position of its begin token, item)

    @property
    def loss_tokens(self) -> int:
        return int(self.weights.sum())

    @property
    def real_tokens(self) -> int:
        return int((self.segments > 0).sum())


def collate(examples: list[Encoded], rows: list[list[int]], max_seq_len: int,
            multiple: int = PAD_MULTIPLE) -> Batch:  # fmt: skip
    """The rows as arrays, padded to their longest rounded up to `multiple`."""
    used = [sum(len(examples[i]) - 1 for i in row) for row in rows]
    length = padded_length(max(used), max_seq_len, multiple)
    shape = (len(rows), length)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    weights, segments = np.zeros(shape, np.float32), np.zeros(shape, np.int32)
    placed = []  # (flat position of the begin token, item), in batch order
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row, start=1):
            ex = examples[i]
            n = len(ex) - 1
            inputs[r, at : at + n] = ex.ids[:-1]
            targets[r, at : at + n] = ex.ids[1:]
            weights[r, at : at + n] = ex.loss[1:]
            segments[r, at : at + n] = s
            placed += [(r * length + at + m.start, m) for m in ex.media]
            at += n
    return Batch(inputs, targets, weights, segments, tuple(placed))


def media_arrays(placed, positions: int, soft_rows: dict[str, int] | None = None,
                 round_up: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """The media of a micro-batch as the model takes them (empty for a text batch).

    For each kind (image, audio): the tower's inputs (`pack_media`) and `{kind}_take`, the rows
    of the tower's output that are real soft tokens, in batch order. A kind in `soft_rows` has
    its soft tokens computed elsewhere (that many rows, which the caller adds as `{kind}_soft`,
    padded to `soft_block()` rows). `source[p]` is the row of [token embeddings (one per
    position); image rows; audio rows] that position p takes: itself, or its soft token.
    `round_up`: pad the number of images and clips to a power of two with empty ones (for a
    compiled step; transformers' Gemma 4 would count an empty image as one soft token).
    """
    if not placed:
        return {}
    soft_rows = soft_rows or {}
    source = np.arange(positions, dtype=np.int32)
    out: dict[str, np.ndarray] = {}
    base = positions
    for kind in ("image", "audio"):
        items = [(p, m) for p, m in placed if m.kind == kind]
        if not items:
            continue
        if kind in soft_rows:
            block = soft_block(soft_rows[kind])
        else:
            arrays, take = pack_media([m for _, m in items], round_up)
            out |= arrays | {f"{kind}_take": take}
            block = len(take)
        # Placeholders past an item's tower rows (Gemma 3n's audio padding) keep their own row.
        where = np.concatenate([np.arange(p + 1, p + 1 + m.soft) for p, m in items])
        source[where] = base + np.arange(len(where))
        base += block
    out["source"] = source
    return out


def soft_block(rows: int) -> int:
    """Rows a block of precomputed soft tokens is padded to, so a compiled step sees few shapes."""
    return _bucket(rows, SOFT_MULTIPLE)


def pack_media(items: list[MediaItem], round_up: bool = True
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:  # fmt: skip
    """A tower's inputs for items of one kind, and the rows of its output that are theirs.
    `round_up` pads the item count to a power of two (for a compiled step; not needed eagerly)."""
    pack = PACKERS[type(items[0].spec)]
    return pack(items, _pow2(len(items)) if round_up else len(items))


def _bucket(n: int, multiple: int) -> int:
    return max(-(-n // multiple) * multiple, multiple)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pack_images(items: list[MediaItem], n: int):
    loaded = [m.arrays() for m in items]
    k = items[0].spec.pooling_kernel_size
    patches = _bucket(max(len(p) for p, _ in loaded), k * k * 16)
    tokens = patches // (k * k)
    pixels = np.zeros((n, patches, loaded[0][0].shape[1]), np.uint8)
    positions = np.full((n, patches, 2), -1, np.int32)
    pool = np.zeros((n, tokens, k * k), np.int32)
    take = []
    for i, ((p, pos), item) in enumerate(zip(loaded, items, strict=True)):
        pixels[i, : len(p)], positions[i, : len(p)] = p, pos
        index = pool_index(pos, k)
        pool[i, : len(index)] = index
        take.append(i * tokens + np.arange(item.tokens))
    arrays = {"image_patches": pixels, "image_positions": positions, "image_pool": pool}
    return arrays, np.concatenate(take).astype(np.int32)


def _pack_audio(items: list[MediaItem], n: int):
    loaded = [m.arrays() for m in items]
    frames = _bucket(max(len(f) for f, _ in loaded), AUDIO_FRAME_MULTIPLE)
    features = np.zeros((n, frames, loaded[0][0].shape[1]), np.float32)
    valid = np.zeros((n, frames), bool)
    for i, (f, v) in enumerate(loaded):
        features[i, : len(f)], valid[i, : len(v)] = f, v
    after = valid[:, ::2][:, ::2]  # validity after the two stride-2 convolutions
    take = np.flatnonzero(after.reshape(-1)).astype(np.int32)
    return {"audio_features": features, "audio_valid": valid}, take


def _pack_fixed_images(items: list[MediaItem], n: int):
    """Gemma 3n: whole images of one size; every soft token of the tower's output is real."""
    pixels = np.zeros((n, items[0].spec.height, items[0].spec.width, 3), np.uint8)
    for i, m in enumerate(items):
        pixels[i] = m.arrays()[0]
    tokens = items[0].spec.tokens
    take = np.concatenate([i * tokens + np.arange(tokens) for i in range(len(items))])
    return {"image_pixels": pixels}, take.astype(np.int32)


def _pack_usm_audio(items: list[MediaItem], n: int):
    """Gemma 3n: mel frames, zero past each clip's end (what the tower's own padding gives a clip
    alone); the tower's output has one row per `frames_per_token` frames, of which each clip's
    first `soft` are real."""
    loaded = [m.arrays()[0] for m in items]
    per = items[0].spec.frames_per_token
    frames = _bucket(max(len(f) for f in loaded), AUDIO_FRAME_MULTIPLE)
    features = np.zeros((n, frames, loaded[0].shape[1]), np.float32)
    valid = np.zeros((n, frames), bool)
    for i, f in enumerate(loaded):
        features[i, : len(f)], valid[i, : len(f)] = f, True
    rows = -(-frames // per)
    take = np.concatenate([i * rows + np.arange(m.soft) for i, m in enumerate(items)])
    return {"audio_features": features, "audio_valid": valid}, take.astype(np.int32)


PACKERS = {ImageSpec: _pack_images, AudioSpec: _pack_audio,
           FixedImageSpec: _pack_fixed_images, USMAudioSpec: _pack_usm_audio}  # fmt: skip


@dataclass(frozen=True)
class Position:
    """Where the stream stands: the next micro-batch is plan(epoch)[index]."""

    epoch: int = 0
    index: int = 0


@dataclass(frozen=True)
class Share:
    """One rank's share of a global micro-batch, and the global batch's counts (which every
    rank computes from the plan, with no communication): the loss of a step is normalised by
    the global count of target tokens, so N ranks update exactly as one process would."""

    batch: Batch | None  # None: this rank has no row of this micro-batch
    loss_tokens: int  # target tokens of the whole micro-batch
    real_tokens: int  # example tokens of the whole micro-batch
    slots: int  # row slots, padding included, summed over every rank's share
    rows: list[list[int]] = field(default_factory=list)  # this rank's rows (example indices)


class Stream:
    """Endless micro-batches over epochs, resumable from a Position."""

    def __init__(self, data: Dataset, batching: Batching, seed: int):
        self.data, self.batching, self.seed = data, batching, seed
        self._plans: dict[int, list] = {}

    def plan(self, epoch: int) -> list[list[list[int]]]:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.data.lengths, self.batching, self.seed, epoch)}
        return self._plans[epoch]

    def take(self, at: Position) -> tuple[Batch, Position]:
        """The micro-batch at `at`, and the position after it."""
        plan = self.plan(at.epoch)
        batch = collate(self.data.examples, plan[at.index], self.batching.max_seq_len)
        after = Position(at.epoch, at.index + 1)
        return batch, after if after.index < len(plan) else Position(at.epoch + 1, 0)

    def share(self, at: Position, rank: int, size: int) -> tuple[Share, Position]:
        """Rank `rank`'s share of the micro-batch at `at` (see `split_rows`), and the position
        after it."""
        plan = self.plan(at.epoch)
        rows = plan[at.index]
        lengths = self.data.lengths
        parts = split_rows(rows, lengths, size)
        mine = parts[rank]
        batch = collate(self.data.examples, mine, self.batching.max_seq_len) if mine else None
        examples = [i for row in rows for i in row]
        losses = self.data.loss_counts
        slots = sum(len(p) * self.batching.padded(max(sum(int(lengths[i]) for i in r) for r in p))
                    for p in parts if p)  # fmt: skip
        share = Share(batch, int(losses[examples].sum()), int(lengths[examples].sum()), slots, mine)
        after = Position(at.epoch, at.index + 1)
        return share, after if after.index < len(plan) else Position(at.epoch + 1, 0)


def ordered_batches(data: Dataset, batching: Batching):
    """Every example once, in a fixed order: for validation."""
    plan = plan_epoch(data.lengths, batching, 0, 0, shuffle=False)
    return [collate(data.examples, rows, batching.max_seq_len) for rows in plan]


class DataOf:
    """What an engine (MLX or PyTorch) derives from its config and loaded checkpoint for data:
    the media plan and prepared datasets. Needs `cfg` and `loaded` attributes."""

    @property
    def model(self):
        return self.loaded.model

    @property
    def media(self):
        return self.loaded.media_plan(self.cfg.data.image_soft_tokens)

    def dataset(self, path: str) -> Dataset:
        from .rows import read_rows

        d = self.cfg.data
        return prepare(read_rows(path), self.loaded.tokenizer, d.max_seq_len, d.loss_on,
                       d.overlong, self.loaded.stop_ids, self.media)  # fmt: skip
