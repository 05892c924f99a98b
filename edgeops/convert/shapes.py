"""Other input shapes a signature allows, and inputs at those shapes: a converted model is
checked at every shape it claims to accept, not only the one it was traced or verified at.

`alternatives(signature, feeds)` lists, for the dims a signature leaves dynamic, one other
concrete size each: batch 1 (or 3 when the check ran at batch 1), and for every other
dynamic dim (height, width, sequence length) a larger size that keeps the dim's power-of-two
stride (320 -> 416 keeps a multiple of 32, 16 -> 24 a multiple of 8). Dims that share a
name move together (a GRU state [1, batch, 64] follows the feature's batch).
`reshape_feeds` builds inputs at those shapes: floats are seeded random, integers and bools
are the original values tiled or cropped per axis (ids and lengths stay valid ids and
lengths), so both models can run them.
"""

from __future__ import annotations

import numpy as np

from ..formats.base import Signature


def _stride(n: int) -> int:
    s = 1
    while n % (s * 2) == 0 and s < 32:
        s *= 2
    return s


def grow(n: int) -> int:
    s = _stride(n)
    return max(n + s, -(-int(n * 1.3) // s) * s)


def alternatives(signature: Signature, feeds: dict[str, np.ndarray],
                 batch_axes: dict[str, int | None] | None = None) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """[(label, {input: shape})] for each dynamic dim group of SIGNATURE, sizes taken from
    FEEDS (the shapes already checked). Empty when every dim is fixed."""
    from ..optimize.gates import batch_axes as _batch_axes

    axes = batch_axes if batch_axes is not None else _batch_axes(signature)
    base = {k: tuple(np.shape(v)) for k, v in feeds.items()}
    groups: dict[str, list[tuple[str, int]]] = {}     # dim key -> [(input, axis)]
    for spec in signature.inputs:
        if spec.shape is None or spec.name not in base or len(spec.shape) != len(base[spec.name]):
            continue
        for ax, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                continue
            key = d if isinstance(d, str) and d else f"{spec.name}:{ax}"
            if axes.get(spec.name) == ax:
                key = "batch"           # every input's batch axis moves together
            groups.setdefault(key, []).append((spec.name, ax))
    out = []
    batch_keys = {k for k, members in groups.items()
                  if any(axes.get(n) == a for n, a in members)}
    for key, members in groups.items():
        size = base[members[0][0]][members[0][1]]
        alt = (1 if size != 1 else 3) if key in batch_keys else grow(size)
        shapes = {k: list(v) for k, v in base.items()}
        for name, ax in members:
            shapes[name][ax] = alt
        label = f"{'batch' if key in batch_keys else key} {size} -> {alt}"
        out.append((label, {k: tuple(v) for k, v in shapes.items()}))
    return out


def reshape_feeds(feeds: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                  seed: int = 7) -> dict[str, np.ndarray]:
    """FEEDS at SHAPES: seeded random floats, integer/bool values tiled or cropped."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in feeds.items():
        v = np.asarray(v)
        want = tuple(shapes.get(k, v.shape))
        if want == v.shape:
            out[k] = v
        elif np.issubdtype(v.dtype, np.floating):
            out[k] = rng.standard_normal(want).astype(v.dtype)
        else:
            a = v
            for ax, n in enumerate(want):
                if a.shape[ax] == n:
                    continue
                reps = -(-n // max(a.shape[ax], 1))
                a = np.take(np.concatenate([a] * reps, axis=ax) if reps > 1 else a,
                            np.arange(n), axis=ax)
            out[k] = a
    return out
