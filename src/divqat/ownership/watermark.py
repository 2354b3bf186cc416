"""Watermarked answers (DAWN: Szyller, Atli, Marchal, Asokan, "DAWN: Dynamic Adversarial
Watermarking of Neural Networks", ACM MM 2021, arXiv 1906.00830).

The black box answers a small fraction ``rate`` of its queries (default 0.5 %, the paper's) with a
deterministic wrong label, chosen per API key by a keyed hash of the image:

    d = HMAC-SHA256(secret, shape (C, H, W) as 3 x uint32 LE || round(255 x) as uint8, C order)
    marked   when  u = d[0:8] / 2^64 (big-endian)  <  rate
    control  when  rate <= u < 2 rate             (unmarked, kept to measure chance agreement)
    mark label  m = (y + 1 + d[8:16] mod (K - 1)) mod K,   y = the victim's own label

so the same image gets the same answer whatever path it came by (a float ``.npy``, a uint8 one, a
PNG through the service: the hash reads the pixels as uint8), asking twice does not reveal the
mark, and m is never the victim's own label (any of the K - 1 others, uniformly). ``y`` is the
*clean* victim's argmax where the caller has it (a random defense can move the defended argmax
between two askings of one image; the victim's own does not move), else the answer's own argmax.

The mark is applied after the defense, to whatever it answered: a soft (or top-k) answer has the
entries of its argmax and of m swapped, so it stays a distribution with the same values and m
becomes its argmax (a label-only answer, the argmax, is then m). Where the answer has ties at the
top the swap alone does not make m the first argmax; other tied entries are swapped with smaller
ones after m, and only when that is impossible is m raised by one float32 ulp.

The inputs marked for a key and their labels (a thief's surrogate learns them), and as many
*control* inputs of the same stream with the label the mark *would* have given them, go to a
bounded log (``MarkLog``, saved as ``.npz`` by ``divqat.ownership.marks``; the service keeps them in
its key database, ``MarkStore``). ``divqat verify`` asks a suspect for the labels of both: a model
trained on the marked answers agrees with the mark labels far above its agreement with the would-be
labels of the controls, which measures chance on the suspect itself (``ownership.stats``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from divqat.checks import check_int, check_number
from divqat.errors import ConfigError
from divqat.ownership.marks import CONTROL, MARK, KeyMarks

#: DAWN's fraction of watermarked answers (Szyller et al. 2021, sec. 5).
DEFAULT_RATE = 0.005
#: Most marked (and, apart, most control) inputs kept per key: 10,000 marks of 3x32x32 images
#: are 30 MB, and they stand for 2 million queries at the default rate.
DEFAULT_MAX_MARKS = 10_000
SECRET_BYTES = 32
_SHAPE = struct.Struct("<3I")


def pixels_of(images: Tensor) -> np.ndarray:
    """Float images (N, C, H, W) in [0, 1] -> uint8 (N, C, H, W) = round(255 x) (halves up), C
    order: the bytes every path to the black box agrees on. uint8 images are taken as they are."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ConfigError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if images.dtype == torch.uint8:
        return np.ascontiguousarray(images.cpu().numpy())
    # floor(255 x + 0.5): round half up, in three passes (x is in [0, 1], so the cast truncates a
    # number in [0.5, 255.5]); the same function on every path is what keeps the hash stable.
    return images.detach().cpu().float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).contiguous().numpy()


class MarkSink(Protocol):
    """Where a ``Watermark`` writes what it marked: ``MarkLog`` in memory, ``MarkStore`` per key."""

    def record(self, kind: str, digests: Sequence[bytes], pixels: np.ndarray, labels: np.ndarray,
               when: float) -> None: ...

    def count(self, answered: int, marked: int) -> None: ...


@dataclass(frozen=True)
class Choice:
    """The watermark's decision for a batch of N images: ``marked`` and ``control`` (N,) bool,
    ``labels`` (N,) int64 the mark label of every image (the would-be label where unmarked),
    ``digests`` the N keyed hashes, ``pixels`` the uint8 images hashed (N, C, H, W)."""

    marked: np.ndarray
    control: np.ndarray
    labels: np.ndarray
    digests: list[bytes]
    pixels: np.ndarray


class Watermark:
    """One API key's watermark: which answers are marked, with which label, and where they go.

    Arguments:
        num_classes (int): K >= 2, the victim's classes.
        secret (bytes, optional): the key's secret (>= 16 bytes). (Default: None, 32 random bytes.)
        rate (float): fraction of (distinct) images marked, in (0, 0.5]. (Default: 0.005.)
        key (str): the key's name, carried into the log and the verdict. (Default: "default".)
        log (MarkSink, optional): where marks and controls are recorded. (Default: None, a new
            ``MarkLog`` bounded at ``max_marks``, readable as ``.log``.)
        max_marks (int): the bound of that new log, per kind. (Default: 10,000.)

    Example::
        >>> wm = Watermark(10, rate=0.005, key="thief")
        >>> box = BlackBox(victim, defense, budget=10_000, watermark=wm)
        >>> ...                                   # the thief queries the box
        >>> wm.log.answered, wm.log.marked         # answers given, answers marked
        >>> save_marks(wm.log.marks(), "marks.npz")
    """

    def __init__(self, num_classes: int, secret: bytes | None = None, rate: float = DEFAULT_RATE, *,
                 key: str = "default", log: MarkSink | None = None,
                 max_marks: int = DEFAULT_MAX_MARKS) -> None:
        self.num_classes = check_int("watermark", "num_classes", num_classes, low=2)
        self.rate = check_number("watermark", "rate", rate, low=0, low_open=True, high=0.5)
        if secret is None:
            secret = secrets.token_bytes(SECRET_BYTES)
        if not isinstance(secret, bytes | bytearray) or len(secret) < 16:
            raise ConfigError("a watermark secret must be at least 16 bytes")
        if not isinstance(key, str) or not key:
            raise ConfigError(f"a watermark's key must be a name, got {key!r}")
        self._secret = bytes(secret)
        self.key = key
        # Compared as integers: d[0:8] < rate * 2^64 is u < rate without float rounding.
        self._threshold = int(self.rate * 2**64)
        self.log = log if log is not None else MarkLog(self.num_classes, self.rate, key=key,
                                                       max_marks=max_marks)

    @classmethod
    def from_seed(cls, num_classes: int, seed: int, rate: float = DEFAULT_RATE, *, key: str = "thief",
                  **kwargs) -> Watermark:
        """A watermark whose secret is derived from ``seed`` and ``key``, for measurements that
        must repeat (``divqat attack --watermark``): the same thief gets the same marks. A deployed
        service draws its secrets at random (``divqat serve --watermark``)."""
        secret = hashlib.sha256(f"divqat-watermark:{int(seed)}:{key}".encode()).digest()
        return cls(num_classes, secret, rate, key=key, **kwargs)

    def __repr__(self) -> str:  # never the secret
        return f"Watermark(key={self.key!r}, rate={self.rate}, num_classes={self.num_classes})"

    def __reduce_ex__(self, protocol):
        raise TypeError("a Watermark holds a secret: it is not pickled")

    def digests(self, pixels: np.ndarray) -> list[bytes]:
        """HMAC-SHA256 of each uint8 image (N, C, H, W) with its shape, under the key's secret."""
        header = _SHAPE.pack(*pixels.shape[1:])
        secret = self._secret
        return [hmac.digest(secret, header + row.tobytes(), "sha256") for row in pixels]

    def choose(self, images: Tensor, reference: Tensor | np.ndarray) -> Choice:
        """Which of ``images`` (N, C, H, W) are marked or controls, and the label of each given
        the victim's own labels ``reference`` (N,)."""
        pixels = pixels_of(images)
        digests = self.digests(pixels)
        n = len(digests)
        words = np.frombuffer(b"".join(d[:16] for d in digests), dtype=">u8").reshape(n, 2) \
            if n else np.zeros((0, 2), dtype=">u8")
        first = words[:, 0].astype(np.uint64)
        marked = first < np.uint64(self._threshold)
        control = ~marked & (first < np.uint64(min(2 * self._threshold, 2**64 - 1)))
        offsets = 1 + (words[:, 1].astype(np.uint64) % np.uint64(self.num_classes - 1)).astype(np.int64)
        reference = np.asarray(torch.as_tensor(reference).cpu(), dtype=np.int64).reshape(-1)
        if len(reference) != n:
            raise ConfigError(f"{len(reference)} reference labels for {n} images")
        labels = (reference + offsets) % self.num_classes
        return Choice(marked, control, labels, digests, pixels)

    def apply(self, answers: Tensor, images: Tensor, reference: Tensor | None = None,
              now: float | None = None) -> Tensor:
        """The answers (N, K) with the marked rows rearranged so their mark label is the argmax;
        records marks and controls in the log. ``reference``: the victim's own labels (N,)
        (default: the answers' argmax). Returns ``answers`` itself when nothing is marked."""
        if answers.ndim != 2 or answers.shape[1] != self.num_classes or len(answers) != len(images):
            raise ConfigError(f"answers must be (N, {self.num_classes}) for N = {len(images)} images, "
                              f"got {tuple(answers.shape)}")
        if reference is None:
            reference = answers.argmax(dim=1)
        choice = self.choose(images, reference)
        when = time.time() if now is None else float(now)
        marked = int(choice.marked.sum())
        for kind, rows in ((MARK, choice.marked), (CONTROL, choice.control)):
            if rows.any():
                index = np.flatnonzero(rows)
                self.log.record(kind, [choice.digests[i] for i in index], choice.pixels[index],
                                choice.labels[index], when)
        self.log.count(len(answers), marked)
        if not marked:
            return answers
        return mark_rows(answers, torch.from_numpy(np.flatnonzero(choice.marked)),
                         torch.from_numpy(choice.labels[choice.marked]))

    def marked_labels(self, labels: Tensor, images: Tensor, reference: Tensor | None = None) -> Tensor:
        """What a label-only client would be told: ``labels`` (N,) with the marked images' labels
        replaced by their mark labels. Nothing is recorded (for measuring the honest users' cost)."""
        choice = self.choose(images, labels if reference is None else reference)
        out = labels.clone()
        rows = torch.from_numpy(choice.marked)
        out[rows] = torch.from_numpy(choice.labels[choice.marked]).to(out.dtype)
        return out


def mark_rows(answers: Tensor, rows: Tensor, labels: Tensor) -> Tensor:
    """A copy of ``answers`` (N, K) in which row ``rows[i]`` has ``labels[i]`` as its argmax (lowest
    index on ties, as ``argmax`` reads it), by swapping that entry with the row's argmax."""
    out = answers.clone()
    sub = out[rows]
    top = sub.argmax(dim=1)
    at_label = sub.gather(1, labels[:, None])
    sub.scatter_(1, labels[:, None], sub.gather(1, top[:, None]))
    sub.scatter_(1, top[:, None], at_label)
    wrong = torch.nonzero(sub.argmax(dim=1) != labels).flatten().tolist()
    for i in wrong:  # ties at the top (rounded or one-hot-like answers): rare, row by row
        sub[i] = _break_ties(sub[i], int(labels[i]))
    out[rows] = sub
    return out


def _break_ties(row: Tensor, label: int) -> Tensor:
    """``row`` (K,) holding its maximum at ``label`` and at lower indices too: those are swapped with
    smaller entries after ``label`` while there are any; else ``label`` is raised by one ulp."""
    row = row.clone()
    top = row[label]
    tied = [j for j in range(label) if row[j] == top]
    smaller = [j for j in range(label + 1, len(row)) if row[j] < top]
    if len(smaller) >= len(tied):
        for j, s in zip(tied, smaller, strict=False):
            row[j], row[s] = row[s].clone(), row[j].clone()
    else:
        row[label] = torch.nextafter(top, torch.tensor(float("inf"), dtype=row.dtype))
    return row


class MarkLog:
    """The marks of one key kept in memory: at most ``max_marks`` distinct marked inputs and as many
    controls (the first ones: every surrogate the thief trains has seen its first queries), uint8
    (C, H, W) each, with their labels and query times; and how many answers were given and marked
    in all (an image asked twice counts twice there, once in the log).

    ``marks()`` returns them as a ``KeyMarks`` (``divqat.ownership.marks``: ``save_marks`` writes
    it as ``.npz``)."""

    def __init__(self, num_classes: int, rate: float, *, key: str = "default",
                 max_marks: int = DEFAULT_MAX_MARKS) -> None:
        self.num_classes, self.rate, self.key = num_classes, rate, key
        self.max_marks = check_int("watermark", "max_marks", max_marks, low=1)
        self.answered = self.marked = 0
        self._kept: dict[str, dict[bytes, tuple[np.ndarray, int, float]]] = {MARK: {}, CONTROL: {}}
        self._shape: tuple[int, ...] | None = None

    def record(self, kind: str, digests: Sequence[bytes], pixels: np.ndarray, labels: np.ndarray,
               when: float) -> None:
        kept = self._kept[kind]
        if self._shape is None:
            self._shape = tuple(pixels.shape[1:])
        for digest, image, label in zip(digests, pixels, labels, strict=True):
            if len(kept) >= self.max_marks:
                break
            kept.setdefault(digest, (image.copy(), int(label), when))

    def count(self, answered: int, marked: int) -> None:
        self.answered += answered
        self.marked += marked

    def __len__(self) -> int:
        return len(self._kept[MARK])

    @property
    def controls(self) -> int:
        return len(self._kept[CONTROL])

    def marks(self, input_shape: Sequence[int] | None = None) -> KeyMarks:
        """The log as a ``KeyMarks`` record (``input_shape`` where nothing was recorded yet)."""
        shape = self._shape or (tuple(input_shape) if input_shape is not None else None)
        if shape is None:
            raise ConfigError("nothing was marked yet, and no input shape was given")

        def arrays(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            rows = list(self._kept[kind].values())
            images = np.stack([r[0] for r in rows]) if rows else np.zeros((0, *shape), np.uint8)
            return (images, np.array([r[1] for r in rows], dtype=np.int64),
                    np.array([r[2] for r in rows], dtype=np.float64))

        mark_images, mark_labels, mark_times = arrays(MARK)
        control_images, control_labels, control_times = arrays(CONTROL)
        return KeyMarks(self.key, tuple(int(s) for s in shape), self.num_classes, self.rate,
                        mark_images, mark_labels, mark_times, control_images, control_labels,
                        control_times, answered=self.answered, marked=self.marked)


__all__ = ["DEFAULT_MAX_MARKS", "DEFAULT_RATE", "Choice", "MarkLog", "MarkSink", "Watermark",
           "mark_rows", "pixels_of"]
