"""Tiny PyTorch models saved in every way torch saves a model, for the torch and Core ML
tests. Plain functions: each builds a seeded model, writes `path` and returns it.

Data comes from scikit-learn's bundled digits (8x8 images), so shapes are realistic
without any download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, n_in: int = 64, n_hidden: int = 32, n_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(n_in, n_hidden)
        self.fc2 = nn.Linear(n_hidden, n_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class CNN(nn.Module):
    """Conv / BatchNorm / ReLU / MaxPool / AdaptiveAvgPool / Linear on 1x8x8 digits."""

    def __init__(self, n_out: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, n_out)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(self.gap(x), 1))


def digits(n: int = 2, image: bool = False) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = (load_digits().data[:n] / 16.0).astype(np.float32)
    return x.reshape(n, 1, 8, 8) if image else x


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def cnn(seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    m = CNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is tested
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def mlp_torchscript(path: str | Path, traced: bool = False) -> Path:
    m = mlp()
    sm = torch.jit.trace(m, torch.from_numpy(digits(2))) if traced else torch.jit.script(m)
    sm.save(str(path))
    return Path(path)


def cnn_torchscript(path: str | Path, traced: bool = True) -> Path:
    m = cnn()
    sm = torch.jit.trace(m, torch.from_numpy(digits(2, image=True))) if traced else torch.jit.script(m)
    sm.save(str(path))
    return Path(path)


def cnn_export_pt2(path: str | Path, dynamic_batch: bool = False) -> Path:
    m = cnn()
    x = torch.from_numpy(digits(2, image=True))
    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch else None
    torch.export.save(torch.export.export(m, (x,), dynamic_shapes=dyn), str(path))
    return Path(path)


def mlp_state_dict(path: str | Path, legacy: bool = False) -> Path:
    torch.save(mlp().state_dict(), str(path), _use_new_zipfile_serialization=not legacy)
    return Path(path)


def mlp_pickled_module(path: str | Path, legacy: bool = False) -> Path:
    torch.save(mlp(), str(path), _use_new_zipfile_serialization=not legacy)
    return Path(path)


def cnn_onnx(path: str | Path, opset: int = 17, dynamic_batch: bool = True) -> Path:
    """ONNX written by torch's TorchScript exporter (the route onnx2torch supports at 17)."""
    import warnings

    x = torch.from_numpy(digits(2, image=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(cnn(), (x,), str(path), input_names=["x"], output_names=["logits"],
                          opset_version=opset, dynamo=False,
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}
                          if dynamic_batch else None)
    return Path(path)
