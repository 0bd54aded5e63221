"""The clipper's per-pass bookkeeping (trustml.privacy.clipping): every change to the model's
parameters between steps is picked up (added, removed, replaced, moved between modules, frozen,
unfrozen), each step against the per-sample loop in float64; an expanded call under dropout is
replayed from the random state its forward started from; and the shortcuts taken around torch's
own functions (gradient edges) agree with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from test_privacy_clipping import naive

from trustml.privacy import PerSampleClipper
from trustml.privacy.clipping import _edge

B = 6


def losses_of(model, x):
    out = model(x)
    return (out**2).sum(1) + out.sin().sum(1)


class Scale(nn.Module):
    """A generic-path module that multiplies by its parameter ``s`` when it has one."""

    def __init__(self, s: nn.Parameter | None):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x if self.s is None else x * self.s


def build():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Scale(nn.Parameter(torch.rand(4) + 0.5)),
                         Scale(None), nn.Linear(4, 3)).double()


def move(m):  # the same Parameter object, now held by the next module
    m[3].s, m[2].s = m[2].s, None


def add_bias(m):
    m[3].s = nn.Parameter(torch.rand(4, dtype=torch.float64) + 0.5)


CHANGES = {
    "freeze": lambda m: m[0].weight.requires_grad_(False),
    "unfreeze": lambda m: m[0].weight.requires_grad_(True),
    "replace a parameter": lambda m: setattr(
        m[4], "bias", nn.Parameter(torch.randn(3, dtype=torch.float64))),
    "remove a parameter": lambda m: setattr(m[4], "bias", None),
    "move a parameter to another module": move,
    "add a parameter": add_bias,
    "replace a module": lambda m: m.__setitem__(0, nn.Linear(5, 4).double()),
    "add a module": lambda m: m.append(nn.Linear(3, 2).double()),
}


def test_parameter_changes_between_steps_are_picked_up():
    """One clipper across all the changes, each followed by a step compared with the per-sample
    loop on an unhooked twin given the same change (from the same seed)."""
    torch.manual_seed(0)
    model, twin = build(), build()
    twin.load_state_dict(model.state_dict())
    twin[2].s, twin[3].s = nn.Parameter(model[2].s.detach().clone()), None
    x = torch.randn(B, 5, dtype=torch.float64)
    clipper = PerSampleClipper(model, 1.0)

    def step_matches_naive(what: str):
        ref_norms, _ = naive(twin, losses_of, [x])
        clipper.max_grad_norm = ref_norms.median().item()  # some samples clipped, some not
        _, ref = naive(twin, losses_of, [x], clipper.max_grad_norm)
        model.zero_grad(set_to_none=True)
        norms = clipper.backward(losses_of(model, x))
        torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=1e-12, msg=what)
        ours = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert [n for n, _ in ours] == [n for n, p in twin.named_parameters() if p.requires_grad]
        for (name, p), r in zip(ours, ref):
            assert p.grad is not None, (what, name)
            torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12, msg=f"{what}: {name}")

    step_matches_naive("first step")
    for seed, (what, change) in enumerate(CHANGES.items()):
        for m in (model, twin):
            torch.manual_seed(seed)
            change(m)
        step_matches_naive(what)
        step_matches_naive(what + ", again")


class Positions(nn.Module):
    """Token embeddings plus batch-1 position embeddings (expanded to the batch by the clipper),
    then dropout; ``mask`` replaces the dropout by a fixed per-sample mask (the reference)."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(10, 4), nn.Embedding(7, 4)
        self.drop, self.head = nn.Dropout(0.5), nn.Linear(4, 3)

    def forward(self, ids, mask=None):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])
        h = self.drop(h) if mask is None else h * mask
        return self.head(h).sum(1)


def test_expanded_call_replayed_with_the_dropout_masks_it_drew():
    """The proof of an expanded output replays the model from the random state the call began
    with: the replay draws the same dropout masks, so the pass is proved (not refused as a changed
    forward), and its clipped sum is the per-sample loop's under those masks."""
    torch.manual_seed(3)
    model, twin = Positions().double(), Positions().double()
    twin.load_state_dict(model.state_dict())
    ids = torch.randint(0, 10, (B, 7))
    masks = []
    model.drop.register_forward_hook(lambda m, a, out: masks.append((out != 0) * 2.0))
    clipper = PerSampleClipper(model, 0.05)
    model.train()
    torch.manual_seed(4)
    losses = losses_of(model, ids)
    assert clipper._calls and clipper._calls[0].expanded  # the positions' output was expanded
    norms = clipper.backward(losses)  # replays the forward: a second mask is drawn there
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    assert not masks[0].all() and masks[0].any()

    def masked(m, ids, mask):
        out = m(ids, mask)
        return (out**2).sum(1) + out.sin().sum(1)

    inputs = [ids, masks[0].double()]
    ref_norms, _ = naive(twin, masked, inputs)
    _, ref = naive(twin, masked, inputs, 0.05)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=1e-12)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("hidden", [0, 1])  # a logistic regression (one plan), an MLP
def test_max_grad_norm_one(hidden):
    """C = 1 skips the product by C; the clip factors are still min(1, 1 / ||g_i||)."""
    torch.manual_seed(5)
    layers = [nn.Linear(5, 4), nn.Tanh()] * hidden + [nn.Linear(4 if hidden else 5, 3)]
    model = nn.Sequential(*layers).double()
    x = torch.randn(B, 5, dtype=torch.float64)
    scale = naive(model, losses_of, [x])[0].median().item()

    def scaled(m, x):  # gradients divided by the median norm: the norms straddle 1
        return losses_of(m, x) / scale

    ref_norms, _ = naive(model, scaled, [x])
    assert (ref_norms > 1).any() and (ref_norms < 1).any()
    _, ref = naive(model, scaled, [x], 1.0)
    clipper = PerSampleClipper(model, 1.0)
    norms = clipper.backward(scaled(model, x))
    torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=1e-12)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)


class Doubled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_edge_is_get_gradient_edge():
    """The shortcut for C++ nodes gives torch's edge; a custom Function's output (whose edge
    needs an ownership token) and a leaf go through ``get_gradient_edge`` itself."""
    w = torch.randn(3, requires_grad=True)
    for t in (w * 2, (w * 2).unbind()[1], Doubled.apply(w), w):
        ours, torchs = _edge(t), get_gradient_edge(t)
        assert ours.node is torchs.node and ours.output_nr == torchs.output_nr
        assert (ours.ownership_token is None) == (torchs.ownership_token is None)
    assert _edge(Doubled.apply(w)).ownership_token is not None
