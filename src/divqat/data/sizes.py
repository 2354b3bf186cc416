"""Datasets loaded at a size the user chooses: ``NAME@H`` or ``NAME@HxW``.

    load_dataset("image-folder@96", "train", root)        # (N, C, 96, 96)
    load_dataset("image-folder@96x128[0-2]", "test", root) # classes 0-2, 96 high, 128 wide

A CNN a user already has runs at its own resolution; squeezing its images to 32x32 would
protect a different model. The size is part of the dataset's *name*, like a class subset
(``divqat.data.subsets``), because the name is what a victim records (``metadata["dataset"]``)
and what every later stage reloads with ``load_dataset(name, split, root)``: the test split, the
held-out transfer set and the thief's queries all come back at the size trained on, without a
size parameter threaded through every driver. The canonical spelling puts the size first and the
subset after it (``image-folder@64[0-2]``: the subset is taken of the set at that size);
``image-folder[0-2]@64`` is read the same.
"""

from __future__ import annotations

import re

from divqat.errors import DatasetError

SIZE_SYNTAX = "H or HxW in pixels, e.g. 96 or 96x128"
MIN_SIDE, MAX_SIDE = 8, 4096
"""Bounds of a side: below 8 px no victim architecture fits; above 4096 is a typo (96128)."""

_SIZE = re.compile(r"^(\d+)(?:[xX](\d+))?$")


def parse_image_size(text: str) -> tuple[int, int]:
    """``"96"`` -> ``(96, 96)``; ``"96x128"`` -> ``(96, 128)`` as (height, width).

    Raises ``DatasetError`` (one line) on anything else or a side outside [8, 4096].
    """
    found = _SIZE.match(str(text).strip())
    if found is None:
        raise DatasetError(f"bad image size {text!r}: expected {SIZE_SYNTAX}")
    height = int(found[1])
    width = int(found[2]) if found[2] is not None else height
    for side in (height, width):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise DatasetError(f"bad image size {text!r}: each side must be {MIN_SIDE} to "
                               f"{MAX_SIDE} pixels, got {side}")
    return height, width


def size_text(size: tuple[int, int]) -> str:
    """``(96, 96)`` -> ``"96"``, ``(96, 128)`` -> ``"96x128"``: the shortest spelling."""
    height, width = size
    return str(height) if height == width else f"{height}x{width}"


def sized_name(name: str, size: tuple[int, int] | None) -> str:
    """The canonical spelling: ``sized_name("image-folder", (96, 96))`` -> ``image-folder@96``.
    A class subset already in ``name`` stays after the size (``image-folder@96[0-2]``)."""
    if size is None:
        return name
    base, bracket, rest = name.partition("[")
    return f"{base}@{size_text(size)}{bracket}{rest}"


def split_size(text: str) -> tuple[str, tuple[int, int] | None]:
    """``"image-folder@64[0-2]"`` -> ``("image-folder[0-2]", (64, 64))``; without ``@`` -> (text, None).

    The size may also follow the subset (``image-folder[0-2]@64``). Raises ``DatasetError``
    (one line) on a bad size or more than one ``@``.
    """
    text = str(text).strip()
    if "@" not in text:
        return text, None
    before, _, after = text.partition("@")
    if "@" in after:
        raise DatasetError(f"bad dataset name {text!r}: one size at most (NAME@{SIZE_SYNTAX})")
    size, bracket, rest = after.partition("[")
    if not before.strip():
        raise DatasetError(f"bad dataset name {text!r}: no dataset before the size")
    return f"{before.strip()}{bracket}{rest}", parse_image_size(size)


__all__ = ["SIZE_SYNTAX", "parse_image_size", "size_text", "sized_name", "split_size"]
