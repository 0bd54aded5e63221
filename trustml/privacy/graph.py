"""Find parameter uses that per-sample clipping cannot see, by walking the autograd graph once.

Every recorded layer call is a *box*: the clipper's rule for it accounts for the gradient that flows
into the parameters it owns through that call, and nothing else. Walking back from the loss, a box
is entered at its output edges and left at its input edges; a trainable parameter reached outside
every box (``h @ emb.weight.T`` beside ``emb(ids)``), or inside a box that does not own it (a tensor
computed elsewhere and read from an attribute), is a use whose per-sample gradient would be
silently dropped. This is exact by construction: it reads the graph autograd will differentiate.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor

Edge = tuple[object, int]  # (autograd node, output number): where a tensor's gradient enters
LEAF = torch._C._functions.AccumulateGrad  # a leaf's node: its ``variable`` is the tensor
REENTRANT = torch.utils.checkpoint.CheckpointFunction._backward_cls  # use_reentrant=True


class ReentrantCheckpoint(Exception):
    """The graph holds a reentrant ``torch.utils.checkpoint``: its backward runs a nested
    ``backward()`` that accepts no ``inputs=``, so no layer output gradient can be taken."""


@dataclass
class Box:
    outputs: list[Edge]
    inputs: list[Edge]
    owned: set[int]  # ids of the parameters the box's rule accounts for


def stray_uses(loss: Tensor, boxes: list[Box], trainable: Collection[int]
               ) -> tuple[list[tuple[int, int | None]], int]:
    """(id of the parameter, index of the box it was reached in, or None outside every box)
    for each trainable parameter the loss reaches outside its boxes, and a fingerprint of the
    graph's structure (node types and box membership in walk order).

    One walk (with the boxes built) costs about 0.08 ms for the Adult MLP in a step, so the
    clipper runs it on every pass: the stray check then holds for every pass, and a changed
    fingerprint (an op that was not in the proved graph, e.g. one that mixes samples on some
    steps only) sends the pass to a new proof. Per node: one tuple, two dict or set look-ups and
    one hash (edges as plain (node, nr) tuples, leaves found by type, not ``getattr``).
    """
    out_of: dict[Edge, int] = {}
    ins = [set(b.inputs) for b in boxes]
    for i, b in enumerate(boxes):
        for e in b.outputs:
            if e not in ins[i]:  # a module returning its own input is not a box there
                out_of[e] = i
    found: dict[int, int | None] = {}
    seen: set[tuple] = set()
    fingerprint = 0
    stack: list[tuple[object, int, int | None]] = [(loss.grad_fn, 0, None)]
    while stack:
        node, nr, box = stack.pop()
        edge = (node, nr)
        if box is not None and edge in ins[box]:
            box = None  # left the box through one of its inputs
        box = out_of.get(edge, box)
        if (node, box) in seen:
            continue
        seen.add((node, box))
        kind = type(node)
        if kind is REENTRANT:
            raise ReentrantCheckpoint
        fingerprint = hash((fingerprint, kind, nr, box))
        if kind is LEAF:
            pid = id(node.variable)
            if pid in trainable and (box is None or pid not in boxes[box].owned):
                found.setdefault(pid, box)
            continue
        for child, child_nr in node.next_functions:
            if child is not None:
                stack.append((child, child_nr, box))
    return list(found.items()), fingerprint


def gradient_hooked(params: list[Tensor]) -> list[Tensor]:
    """Trainable parameters carrying a gradient hook (``p.register_hook``: a mask, a rescale). The
    clipper never computes a parameter's batch gradient, so such a hook would never run: the
    per-sample gradients would be the unhooked ones, silently. One attribute read per parameter."""
    return [p for p in params if p._backward_hooks]
