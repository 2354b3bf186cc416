"""Write an RGB image folder from the data shipped with divqat, for the "Protect your own model" walkthrough.

The walkthrough needs what a user arrives with: a folder of colour photos at the size their model
runs at, in ``DIR/train/<class>/*.png``, ``DIR/test/<class>/*.png`` and ``DIR/val/<class>/*.png``
(images the model never trained on: a thief's in-distribution transfer set), and no download. This
writes one from the offline sets: five Fashion-MNIST classes and five animal silhouettes, upscaled
(bicubic) from 28x28 to ``--size`` and colourized with a random foreground and background colour
per image (drawn independently of the class, so colour carries no label), plus mild pixel noise.

    python scripts/make_image_folder.py --out photos --size 64 --per-class 400 --test-per-class 100 \
        --val-per-class 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from divqat.data import load_dataset

# (dataset, class index, folder name): ten classes, two sources.
CLASSES = (
    ("fashion-mnist", 0, "tshirt"), ("fashion-mnist", 1, "trouser"), ("fashion-mnist", 5, "sandal"),
    ("fashion-mnist", 8, "bag"), ("fashion-mnist", 9, "ankle-boot"),
    ("animal-mnist", 0, None), ("animal-mnist", 1, None), ("animal-mnist", 2, None),
    ("animal-mnist", 3, None), ("animal-mnist", 4, None),
)


def colourize(gray: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """A 28x28 uint8 image -> an RGB PIL image of ``size`` px: foreground colour where the image
    is bright, background colour where it is dark, plus noise."""
    up = Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC)
    alpha = np.asarray(up, dtype=np.float32)[..., None] / 255.0
    fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(fg - bg).sum() < 150:  # keep the object visible
        bg = rng.uniform(0, 255, 3)
    rgb = alpha * fg + (1 - alpha) * bg + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def write_folder(out: Path, size: int, per_class: int, test_per_class: int, val_per_class: int,
                 data_root: str | None, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    written = 0
    # val/ comes from the end of the training split, after the images train/ took.
    for split, source, count in (("train", "train", per_class), ("val", "train", val_per_class),
                                 ("test", "test", test_per_class)):
        if count == 0:
            continue
        sources = {name: load_dataset(name, source, data_root) for name in {c[0] for c in CLASSES}}
        for name, index, folder in CLASSES:
            data = sources[name]
            label = folder or data.classes[index].lower().replace(" ", "-")
            rows = np.flatnonzero(data.labels == index)
            rows = rows[-count:] if split == "val" else rows[:count]
            if split == "val" and len(rows) + per_class > np.sum(data.labels == index):
                raise SystemExit(f"{name} has too few images of class {index} for {per_class} train "
                                 f"+ {count} val")
            target = out / split / label
            target.mkdir(parents=True, exist_ok=True)
            for i, row in enumerate(rows):
                colourize(data.images[row, 0], size, rng).save(target / f"{i:05d}.png")
            written += len(rows)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder to write (train/ and test/)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--per-class", type=int, default=400, help="training images per class (default: 400)")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class (default: 100)")
    parser.add_argument("--val-per-class", type=int, default=200,
                        help="val/ images per class, never trained on (default: 200; 0: no val/)")
    parser.add_argument("--data-root", default="data", help="where fashion-mnist is (default: data)")
    args = parser.parse_args()
    n = write_folder(Path(args.out), args.size, args.per_class, args.test_per_class, args.val_per_class,
                     args.data_root)
    print(f"wrote {n} RGB images of {args.size}x{args.size} px, 10 classes, to {args.out}/"
          f"{{train,val,test}}")


if __name__ == "__main__":
    main()
