"""Stand in for the user's own training: a torchvision model trained on an image folder with a plain
PyTorch loop (torchvision's ImageFolder, ImageNet normalization, Adam), saved as a state dict.

This is the model a user arrives with in the "Protect your own model" walkthrough; nothing in it
is divqat's except one import that makes torchvision importable beside a CPU-only torch (see
``divqat.models.external``; with matching torch and torchvision builds it is not needed).

    python scripts/train_standin.py --folder photos --arch mobilenet_v3_small --size 64 \
        --epochs 10 --out mine.pt
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from divqat.models.external import import_torchvision

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="DIR with train/<class>/ and test/<class>/")
    parser.add_argument("--arch", default="mobilenet_v3_small", help="a torchvision model name")
    parser.add_argument("--size", type=int, default=64)
    # MobileNetV3's BatchNorm layers update their running statistics slowly (momentum 0.01): with
    # a handful of epochs from scratch the eval-mode model still answers one class everywhere.
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", required=True, help="where to save the state dict (.pt)")
    args = parser.parse_args()
    torch.manual_seed(0)

    torchvision = import_torchvision()
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.Resize(args.size), transforms.CenterCrop(args.size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.Resize(args.size), transforms.CenterCrop(args.size),
                                  transforms.ToTensor(), normalize])
    train = datasets.ImageFolder(f"{args.folder}/train", train_tf)
    test = datasets.ImageFolder(f"{args.folder}/test", test_tf)
    # Decoding in the training process: a small folder of small images decodes faster than
    # worker processes would start, and on two cores they would fight the training for them.
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=len(train.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        start = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(test, batch_size=256):
                correct += int((model(x).argmax(1) == y).sum())
        print(f"epoch {epoch + 1}/{args.epochs}: test accuracy {correct / len(test):.2%} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.arch}'s state dict to {args.out}")


if __name__ == "__main__":
    main()
