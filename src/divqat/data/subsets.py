"""Class subsets of a dataset: ``NAME[a-b]`` or ``NAME[a,b,c]`` (mixable: ``NAME[0-2,7]``).

    load_dataset("fashion-mnist[0-4]", "train")   # T-shirt .. Coat, labels 0..4
    load_dataset("fashion-mnist[5-9]", "train")   # Sandal .. Ankle boot, relabelled 0..4

A subset keeps only the images of the listed classes and relabels them 0..k-1 in the order
written (``[7,2]``: class 7 becomes 0, class 2 becomes 1); the class names go with them. It is
what the paper's out-of-distribution setting needs with one dataset: a victim trained on some
classes and a thief holding natural images of the others. The canonical spelling (ranges of
consecutive ascending classes, no spaces) is the dataset's name everywhere: in the victim's
metadata, so its test split and its ``holdout`` transfer set reload the same subset, in stage
keys and in reports.
"""

from __future__ import annotations

import re

from divqat.errors import DatasetError

_SUBSET = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<classes>[^\[\]]*)\]$")
_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")
SYNTAX = "NAME[a-b] or NAME[a,b,c] with class indices, e.g. fashion-mnist[0-4]"


def split_subset(text: str) -> tuple[str, tuple[int, ...] | None]:
    """``"fashion-mnist[0-4]"`` -> ``("fashion-mnist", (0, 1, 2, 3, 4))``; a plain name -> (name, None).

    Raises ``DatasetError`` (one line) on bad syntax, a backwards range or a class listed twice.
    Whether the classes exist is checked when the set is loaded. One class is a valid subset (a
    transfer set of shirts only); a victim needs two (``divqat train`` checks).
    """
    text = str(text).strip()
    if "[" not in text and "]" not in text:
        return text, None
    match = _SUBSET.match(text)
    if match is None or not match["name"].strip():
        raise DatasetError(f"bad class subset {text!r}: expected {SYNTAX}")
    classes: list[int] = []
    for item in match["classes"].split(","):
        found = _ITEM.match(item.strip())
        if found is None:
            raise DatasetError(f"bad class subset {text!r}: {item.strip()!r} is not a class index or "
                               f"a range a-b; expected {SYNTAX}")
        low = int(found[1])
        high = int(found[2]) if found[2] is not None else low
        if high < low:
            raise DatasetError(f"bad class subset {text!r}: the range {low}-{high} runs backwards; "
                               f"write {high}-{low} or list the classes in the order wanted")
        for k in range(low, high + 1):
            if k in classes:
                raise DatasetError(f"bad class subset {text!r}: class {k} is listed twice")
            classes.append(k)
    return match["name"].strip(), tuple(classes)


def subset_name(name: str, classes: tuple[int, ...] | None) -> str:
    """The canonical spelling: ``subset_name("fashion-mnist", (0, 1, 2, 7))`` -> ``fashion-mnist[0-2,7]``."""
    if classes is None:
        return name
    runs: list[list[int]] = []
    for k in classes:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return f"{name}[{','.join(str(r[0]) if len(r) == 1 else f'{r[0]}-{r[-1]}' for r in runs)}]"


def check_classes(name: str, classes: tuple[int, ...], names: tuple[str, ...]) -> None:
    """DatasetError when a listed class does not exist in a dataset of ``names``."""
    bad = [k for k in classes if k >= len(names)]
    if bad:
        raise DatasetError(f"{name}: class {bad[0]} is out of range; the dataset has classes "
                           f"0-{len(names) - 1} ({', '.join(names)})")


__all__ = ["SYNTAX", "check_classes", "split_subset", "subset_name"]
