"""Ready PyTorch models: an MLP, a small LeNet-style CNN, the classic Hogwild CNN, and a
bag-of-words classifier on an embedding table with sparse gradients."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from paramserver.models import square_side


class MLP(nn.Module):
    """Flatten, then ``layers`` hidden ReLU layers of ``hidden`` units, then logits."""

    def __init__(self, in_features: int, classes: int, hidden: int = 64, layers: int = 1):
        super().__init__()
        dims = [in_features] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))
        self.out = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


class CNN(nn.Module):
    """LeNet-style: two 3x3 conv + 2x2 max-pool blocks, then two linear layers.

    Input ``(channels, side, side)``; works for 8x8 digits and 28x28 images.
    """

    def __init__(self, channels: int, side: int, classes: int, width: int = 16, hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        flat = 2 * width * (side // 4) ** 2
        self.fc1 = nn.Linear(flat, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class HogwildNet(nn.Module):
    """The CNN of PyTorch's mnist_hogwild example (1x28x28 input, 10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return self.fc2(x)


class BagOfWords(nn.Module):
    """The mean of the embeddings of a sample's token ids, then logits.

    Input: int64 ids ``(batch, ids per sample)``. The table has sparse gradients, so a
    step reads and updates only the rows of the ids in its batch."""

    def __init__(self, tokens: int, classes: int, dim: int = 32):
        super().__init__()
        self.embedding = nn.EmbeddingBag(tokens, dim, mode="mean", sparse=True)
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embedding(x))


class SparseLinear(nn.Module):
    """Logistic (softmax) regression on sparse rows: ``logits = x @ W + b`` as an
    ``nn.EmbeddingBag`` in sum mode weighted by the stored values, so the table gets a
    sparse gradient (the rows of the batch's features). Input: a CSR batch, which a
    torch model receives as ``(indices, offsets, per_sample_weights)``."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.table = nn.EmbeddingBag(features, classes, mode="sum", sparse=True)
        nn.init.zeros_(self.table.weight)
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.table(indices, offsets, per_sample_weights=weights) + self.bias


def build(
    name: str, input_shape: tuple[int, ...], classes: int, hidden: int = 64, tokens: int = 0
) -> nn.Module:
    """A model called ``name`` for inputs of ``input_shape`` (without the batch axis);
    ``tokens``: the vocabulary of an embedding model (largest id + 1)."""
    if name == "embedding":
        if len(input_shape) != 1 or tokens < 1:
            raise ValueError(
                f"embedding needs int32/int64 token ids of shape (samples, ids per sample), got "
                f"inputs of shape {input_shape}"
            )
        return BagOfWords(tokens, classes, dim=hidden)
    if name == "mlp":
        return MLP(math.prod(input_shape), classes, hidden)
    if name == "logreg":
        return SparseLinear(math.prod(input_shape), classes)
    if name == "cnn":
        side = square_side(input_shape, "(channels, side, side)")
        if side is not None:
            return nn.Sequential(nn.Unflatten(1, (1, side, side)), CNN(1, side, classes, hidden=hidden))
        if len(input_shape) == 3 and input_shape[1] == input_shape[2]:
            return CNN(input_shape[0], input_shape[1], classes, hidden=hidden)
        raise ValueError(f"cnn needs inputs of shape (channels, side, side), got {input_shape}")
    raise ValueError(f"unknown torch model {name!r}; choose one of mlp, cnn, embedding, logreg")
