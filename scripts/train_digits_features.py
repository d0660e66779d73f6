"""Train the digits feature network that dp eval uses for FID on builtin:digits.

    PYTHONPATH=. python scripts/train_digits_features.py   # writes dpcli/resources/digits_features.safetensors

The network (dpcli.metrics.DigitsFeatureNet: three 3x3 convolutions, 32/64/64 channels, ReLU, global
average pool to 64 features, linear classifier) is trained to classify the 1797 built-in digits, served
at 16x16 exactly as ``--data builtin:digits`` serves them. A fixed, class-stratified 20 % of the images
is held out; the held-out accuracy is printed and stored in the file's metadata. Training sees random
shifts of up to 2 pixels and mild Gaussian noise, so the features also behave on generated images.
Deterministic (seed 0); about half a minute on two CPU cores.
"""

from __future__ import annotations

import sys

import torch

from dpcli.data import builtin_digits, load_images
from dpcli.metrics import DIGITS_WEIGHTS, DigitsFeatureNet

EPOCHS = 60
SHIFT = 1
BATCH = 64
HELD_OUT = 0.2


def split(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-stratified train / held-out indices."""
    train, test = [], []
    for digit in range(10):
        members = (labels == digit).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(len(members) * HELD_OUT)
        test.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train), torch.cat(test)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to SHIFT pixels each way, then mild Gaussian noise."""
    size = images.shape[-1]
    padded = torch.nn.functional.pad(images, (SHIFT,) * 4)
    rows, columns = torch.randint(0, 2 * SHIFT + 1, (2, len(images)), generator=generator)
    shifted = torch.empty_like(images)
    for row in range(2 * SHIFT + 1):
        for column in range(2 * SHIFT + 1):
            chosen = (rows == row) & (columns == column)
            shifted[chosen] = padded[chosen, :, row : row + size, column : column + size]
    noise = 0.05 * torch.randn(shifted.shape, generator=generator)
    return (shifted + noise).clamp(0, 1)


def accuracy(net: DigitsFeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net.logits(images).argmax(1) == labels).float().mean())


def main() -> int:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = (load_images("builtin:digits", size=16, channels=1) + 1) / 2  # [N,1,16,16] in [0,1]
    labels = torch.from_numpy(builtin_digits()[1]).long()
    train, test = split(labels, generator)
    net = DigitsFeatureNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    for epoch in range(EPOCHS):
        net.train()
        order = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            loss = torch.nn.functional.cross_entropy(
                net.logits(augment(images[batch], generator)), labels[batch]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        net.eval()
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(
                f"epoch {epoch + 1}: train accuracy {accuracy(net, images[train], labels[train]):.4f}, "
                f"held-out accuracy {accuracy(net, images[test], labels[test]):.4f}"
            )
    held_out = accuracy(net, images[test], labels[test])
    from safetensors.torch import save_file

    metadata = {
        "held_out_accuracy": f"{held_out:.4f}",
        "train_images": str(len(train)),
        "held_out_images": str(len(test)),
        "epochs": str(EPOCHS),
        "script": "scripts/train_digits_features.py",
    }
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(DIGITS_WEIGHTS), metadata=metadata)
    print(f"held-out accuracy {held_out:.4f} on {len(test)} images; wrote {DIGITS_WEIGHTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
