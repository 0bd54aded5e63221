"""Torch layer zoo: each case is EXACT (to 1e-6 in float64, against the naive per-sample loop) or
REFUSED with an error naming the module and its class -- and which of the two is fixed per case, so
an engine that refused everything would fail. Batch sizes include ones equal to other dimensions
(the sequence length T = 4, a feature width 3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from trustml.privacy import PerSampleClipper
from trustml.privacy.generic import Refusal
from trustml.privacy.layers import RULES, rule_for

T, D = 4, 3
BATCHES = [1, 2, 3, 4, 5]  # 3 == D, 4 == T


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    data: Callable[[int, torch.Generator], list[Tensor]]
    loss: Callable[[nn.Module, list[Tensor]], Tensor]  # per-sample losses (B,)
    dims: list[int] = field(default_factory=lambda: [0])  # each input's batch dim
    expect: str = "exact"  # or "refused" (then ``names`` must appear in the message)
    names: tuple[str, ...] = ()
    take: Callable[[list[Tensor], int], list[Tensor]] | None = None  # sample i's inputs
    exact_when: Callable[[int], bool] | None = None  # else refused (a shape collision)


def sq(out: Tensor, batch_dim: int = 0) -> Tensor:
    out = out.movedim(batch_dim, 0)
    return (out.flatten(1) ** 2).sum(1) + out.flatten(1).sin().sum(1)


def randn(*shape):
    return lambda b, g: [torch.randn(*[b if s == "B" else s for s in shape], generator=g)]


def naive(case: Case, model: nn.Module, inputs: list[Tensor], batch: int):
    params = [p for p in model.parameters() if p.requires_grad]
    grads, norms = [], []
    for i in range(batch):
        mine = (
            case.take(inputs, i)
            if case.take
            else [x.narrow(d, i, 1) for x, d in zip(inputs, case.dims)]
        )
        g = torch.autograd.grad(case.loss(model, mine).sum(), params, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]
        grads.append(g)
        norms.append(torch.sqrt(sum((x**2).sum() for x in g)))
    return params, grads, torch.stack(norms)


def judge(case: Case, batch: int) -> tuple[str, str]:
    torch.manual_seed(0)
    model = case.build().double()
    g = torch.Generator().manual_seed(1)
    inputs = [x.double() if x.is_floating_point() else x for x in case.data(batch, g)]
    clipper = None
    try:
        PerSampleClipper(model, 1.0).remove()  # some layers are refused here already
        params, grads, norms = naive(case, model, inputs, batch)
        c = norms.median().item() if norms.max() > 0 else 1.0
        clipper = PerSampleClipper(model, c)
        want = [
            sum(min(1.0, c / max(n.item(), 1e-300)) * gi[k] for gi, n in zip(grads, norms))
            for k in range(len(params))
        ]
        model.zero_grad(set_to_none=True)
        # odd batches: the sums are added onto a .grad made by ``start`` (DPStep's noise, here a
        # known random tensor; addmm_ / index_add_ / addmv_ in place), even ones written anew
        base = {id(p): torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params}
        start = (lambda p: base[id(p)].clone()) if batch % 2 else None
        got_norms = clipper.backward(case.loss(model, inputs), start=start)
    except Refusal as err:
        for name in case.names:
            assert name in str(err), f"refusal does not name {name!r}: {err}"
        assert str(err).startswith(("module ", "parameter ")), str(err)
        return "refused", str(err)
    finally:
        if clipper is not None:
            clipper.remove()
    torch.testing.assert_close(got_norms, norms, rtol=1e-6, atol=1e-9)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w + base[id(p)] if start else w, rtol=1e-6, atol=1e-9)
    return "exact", ""


def check_case(case: Case, batch: int) -> None:
    """The case's fixed verdict at this batch size (``exact_when`` decides per batch), or fail."""
    expect = case.expect
    if case.exact_when is not None:
        expect = "exact" if case.exact_when(batch) else "refused"
    verdict, why = judge(case, batch)
    assert verdict == expect, why


# ---- models ----------------------------------------------------------------------------------


class RNNHead(nn.Module):
    def __init__(self, kind: type, batch_first: bool, with_state: bool):
        super().__init__()
        self.rnn = kind(D, 5, num_layers=2, bidirectional=True, batch_first=batch_first)
        self.head = nn.Linear(10, 2)
        self.kind, self.with_state = kind, with_state

    def forward(self, x, h0=None, c0=None):
        state = (h0, c0) if self.kind is nn.LSTM else h0
        out, _ = self.rnn(x, state) if self.with_state else self.rnn(x)
        return self.head(torch.tanh(out))


def rnn_case(kind: type, batch_first: bool, with_state: bool) -> Case:
    b = 0 if batch_first else 1
    n_state = (2 if kind is nn.LSTM else 1) if with_state else 0

    def data(batch, g):
        x = torch.randn(*((batch, T, D) if batch_first else (T, batch, D)), generator=g)
        return [x] + [torch.randn(4, batch, 5, generator=g) for _ in range(n_state)]

    return Case(
        f"{kind.__name__}-bf{int(batch_first)}-state{int(with_state)}",
        lambda: RNNHead(kind, batch_first, with_state),
        data,
        lambda m, xs: sq(m(*xs), b),
        dims=[b] + [1] * n_state,
    )


class Attention(nn.Module):
    def __init__(self, batch_first: bool, mask: str):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.batch_first, self.mask = batch_first, mask

    def forward(self, x, pad):
        n = x.shape[1] if self.batch_first else x.shape[0]
        kw = {}
        if self.mask in ("causal", "both"):
            kw["attn_mask"] = torch.ones(n, n, dtype=torch.bool).triu(1)
        if self.mask in ("padding", "both"):
            kw["key_padding_mask"] = pad
        return self.mha(x, x, x, **kw)[0]


def mha_case(batch_first: bool, mask: str, steps: int = T) -> Case:
    b = 0 if batch_first else 1

    def data(batch, g):
        x = torch.randn(*((batch, steps, 4) if batch_first else (steps, batch, 4)), generator=g)
        pad = torch.zeros(batch, steps, dtype=torch.bool)
        pad[0, -1] = steps > 1
        return [x, pad]

    return Case(
        f"mha-bf{int(batch_first)}-{mask}-T{steps}",
        lambda: Attention(batch_first, mask),
        data,
        lambda m, xs: sq(m(*xs), b),
        dims=[b, 0],
    )


class Scaled(nn.Embedding):  # the reproducer: a forward override
    def forward(self, ids):
        return super().forward(ids) * 4.0


class Gained(nn.Linear):  # an extra own parameter
    def __init__(self, *a):
        super().__init__(*a)
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return super().forward(x) * self.gain


class PlainLinear(nn.Linear):  # only a constructor: keeps the fast rule
    def __init__(self, n):
        super().__init__(n, n)


class LearnedPositions(nn.Embedding):
    """BART/BioGPT-style: positions (offset by 2) looked up from the token ids' shape."""

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1) + 2
        return super().forward(pos)


class Tokens(nn.Module):
    def __init__(self, emb: nn.Module, pos: nn.Module | None = None, direct: bool = False):
        super().__init__()
        self.emb, self.pos, self.direct = emb, pos, direct
        self.out = nn.Linear(emb.embedding_dim, 3)

    def forward(self, ids):
        h = self.emb(ids)
        if self.pos is not None:
            h = h + self.pos(ids)
        out = self.out(torch.tanh(h))
        if self.direct:  # the weight used outside the embedding's call
            out = out + (h @ self.emb.weight.T)[..., :3]
        return out


def ids(vocab):
    return lambda b, g: [torch.randint(0, vocab, (b, T), generator=g)]


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        lin = nn.Linear(D, D)
        self.enc = nn.Sequential(lin, nn.Tanh())
        self.proj = lin

    def forward(self, x):
        return self.proj(self.enc(x))


class Gate(nn.Module):
    """Own parameters and no fast rule: the generic path; its child is also called outside it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))  # 0-dim
        self.inner = nn.Linear(D, D)

    def forward(self, x):
        return self.inner(x) * self.scale + torch.tanh(x)


class GateOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate.inner(self.gate(x))


class Reads(nn.Module):
    """A generic-path module that reads a tensor computed elsewhere from an attribute."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.cache: Tensor | None = None

    def forward(self, x):
        return x * self.w + self.cache


class Stash(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), Reads()

    def forward(self, x):
        self.b.cache = self.a.weight.sum()  # reaches the loss inside b's call, not b's parameter
        return self.b(self.a(x))


class SeqFirstLinear(nn.Module):
    """Feeds (T, B, d) to a Linear: its dim 0 is time, its dim 1 the batch (proved by the probe)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return self.lin(x.transpose(0, 1)).cumsum(0).transpose(0, 1)


class FirstTokenSeqFirst(nn.Module):
    """A Linear on the first token of a sequence-first view, (1, B, d): dim 0 is not a batch of 1,
    so expanding it to the batch would change the forward (the forward replay refuses that)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return self.lin(x.transpose(0, 1)[:1]).sum(0)


class RowGain(nn.Module):
    """A generic-path (parameterised, no fast rule) position-wise layer."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return x * self.gain + x.tanh()


class Folded(nn.Module):
    """Rows folded sample-major into dim 0, (B * T, d), through a fast-rule and a generic layer
    (OPT's MLP, Mixtral's router); the output of the generic layer is then modified in place."""

    def __init__(self):
        super().__init__()
        self.lin, self.gain = nn.Linear(D, D), RowGain()

    def forward(self, x):
        rows = self.gain(self.lin(x.reshape(-1, D)))
        rows += x.reshape(-1, D)  # in place, after the call (Falcon's residual)
        return rows.reshape(x.shape)


class Rolled(nn.Module):
    """Sample i mixed with sample i - 2 between two layers: a partner of the same parity (an
    even/odd probe alone misses it at B = 4); at B <= 2 the roll is the identity."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        h = self.a(x)
        return self.b(h + 0.5 * torch.roll(h, 2, 0))


def two_view_loss(m, xs):
    """SimSiam-style: each sample's loss also reads its partner view's output, i + B/2 (mod B)."""
    z = m(*xs)
    return sq(z) + (z * torch.roll(z, z.shape[0] // 2, 0)).sum(1)


class MaskedMix(nn.Module):
    """A generic-path block taking a (T, T) mask (shared by all samples) or a (B, T, T) one."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, D))

    def forward(self, x, mask):
        scores = (x @ self.w @ x.transpose(-1, -2)).masked_fill(mask, -1e9)
        return scores.softmax(-1) @ x


class MaskedModel(nn.Module):
    def __init__(self, per_sample: bool):
        super().__init__()
        self.mix, self.per_sample = MaskedMix(), per_sample

    def forward(self, x):
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        if self.per_sample:
            mask = mask.expand(x.shape[0], T, T).clone()
        return self.mix(x, mask)


class SharedBias(nn.Module):
    """A parameterised call with no batch input whose output every sample shares (T5/Swin bias)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(T, T))

    def forward(self):
        return self.table.unsqueeze(0)


class WithSharedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = SharedBias()
        self.lin = nn.Linear(T, T)

    def forward(self, x):
        return self.lin(x) + self.bias()


class Bag(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 3, mode=mode, padding_idx=0)

    def forward(self, ids, offsets=None, weights=None):
        return self.bag(ids, offsets, per_sample_weights=weights)


OFFSETS = [0, 2, 2, 5, 6, 8]  # bag 1 is empty


def bag_offsets_data(b, g):
    n = OFFSETS[b] + 1
    return [torch.randint(0, 7, (n,), generator=g), torch.tensor(OFFSETS[:b])]


def bag_take(xs, i):
    ids, offsets = xs
    end = offsets[i + 1] if i + 1 < len(offsets) else len(ids)
    return [ids[offsets[i] : end], torch.tensor([0])]


def conv(dim: int) -> Case:
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    size = (5,) * dim

    def build():
        return nn.Sequential(convs[dim](2, 3, 3, padding=1, groups=1), nn.Tanh(),
                             convs[dim](3, 3, 2, groups=3))

    return Case(f"conv{dim}d", build, randn("B", 2, *size), lambda m, xs: sq(m(*xs)))


def norm_model(norm: nn.Module) -> Callable[[], nn.Module]:
    def build():
        m = nn.Sequential(nn.Tanh(), norm)
        for p in m.parameters():
            nn.init.normal_(p)
        return m

    return build


def weight_norm_legacy():
    return nn.Sequential(nn.utils.weight_norm(nn.Linear(D, 5)), nn.Tanh(), nn.Linear(5, 2))


def param_weight_norm():  # out_features (5) == a batch size
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(D, 5)), nn.Tanh(), nn.Linear(5, 2))


def spectral():
    m = nn.Sequential(parametrizations.spectral_norm(nn.Linear(D, 4)), nn.Tanh(), nn.Linear(4, 2))
    return m.eval()  # power iteration updates its vectors on every training-mode call


def orthogonal():
    return nn.Sequential(parametrizations.orthogonal(nn.Linear(D, D)), nn.Tanh(), nn.Linear(D, 2))


def squared_loss(m, xs):
    return sq(m(*xs))


CASES = [
    *[rnn_case(k, bf, st) for k in (nn.RNN, nn.LSTM, nn.GRU) for bf in (True, False)
      for st in (False, True)],
    *[mha_case(bf, mask) for bf in (True, False) for mask in ("padding", "causal", "both")],
    mha_case(False, "padding", steps=1),  # seq-first, one token: (1, B, d) is not a broadcast
    conv(1), conv(2), conv(3),
    Case("layernorm", norm_model(nn.LayerNorm(D)), randn("B", T, D), squared_loss),
    Case("groupnorm", norm_model(nn.GroupNorm(1, D)), randn("B", D, T), squared_loss),
    Case("instancenorm", norm_model(nn.InstanceNorm1d(D, affine=True)), randn("B", D, T),
         squared_loss),
    Case("rmsnorm", norm_model(nn.RMSNorm(D)), randn("B", T, D), squared_loss),
    Case("batchnorm", lambda: nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D)), randn("B", D),
         squared_loss, expect="refused", names=("1 (BatchNorm1d)", "GroupNorm")),
    Case("embeddingbag-sum-2d", lambda: Bag("sum"), ids(7), squared_loss),
    Case("embeddingbag-mean-2d", lambda: Bag("mean"), ids(7), squared_loss),
    Case("embeddingbag-sum-weights",
         lambda: Bag("sum"),
         lambda b, g: [torch.randint(0, 7, (b, T), generator=g), torch.randn(b, T, generator=g)],
         lambda m, xs: sq(m(xs[0], None, xs[1])), dims=[0, 0]),
    Case("embeddingbag-mean-offsets", lambda: Bag("mean"), bag_offsets_data, squared_loss,
         take=bag_take),
    Case("weight_norm-legacy", weight_norm_legacy, randn("B", D), squared_loss),
    Case("parametrizations.weight_norm", param_weight_norm, randn("B", D), squared_loss),
    Case("spectral_norm-eval", spectral, randn("B", D), squared_loss),
    Case("orthogonal", orthogonal, randn("B", D), squared_loss),
    Case("subclass-forward-override", lambda: Tokens(Scaled(11, D)), ids(11), squared_loss),
    Case("subclass-extra-param", lambda: nn.Sequential(Gained(D, D), nn.Tanh()),
         randn("B", T, D), squared_loss),
    Case("subclass-plain", lambda: nn.Sequential(PlainLinear(D), nn.Tanh(), PlainLinear(D)),
         randn("B", T, D), squared_loss),
    Case("learned-positions", lambda: Tokens(nn.Embedding(3, D), LearnedPositions(T + 2, D)),
         ids(3), squared_loss),  # vocab 3 < 6 positions: wrong rows would show
    Case("shared-module", Shared, randn("B", T, D), squared_loss),
    Case("generic-child-called-outside", GateOutside, randn("B", T, D), squared_loss),
    Case("direct-weight-use", lambda: Tokens(nn.Embedding(11, D), direct=True), ids(11),
         squared_loss, expect="refused", names=("emb.weight", "Embedding")),
    Case("weight-read-inside-another-call", Stash, randn("B", T, D), squared_loss,
         expect="refused", names=("a.weight", "Linear", "inside module b (Reads)")),
    Case("sequence-first-linear", SeqFirstLinear, randn("B", T, D), squared_loss),
    # at B == T the (T, T) mask is proved shared: the only choice whose replay fits
    Case("shared-TxT-mask", lambda: MaskedModel(False), randn("B", T, D), squared_loss),
    Case("first-token-sequence-first", FirstTokenSeqFirst, randn("B", T, D), squared_loss,
         names=("lin", "Linear"), exact_when=lambda b: b == 1),
    Case("folded-rows", Folded, randn("B", T, D), squared_loss),
    Case("per-sample-BxTxT-mask", lambda: MaskedModel(True), randn("B", T, D), squared_loss),
    Case("broadcast-position-ids", lambda: TwoEmbeddings(), ids(11), squared_loss),
    Case("same-parity-mix", Rolled, randn("B", D), squared_loss, names=("a (Linear)",),
         exact_when=lambda b: b <= 2),
    Case("two-view-loss", lambda: nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)),
         randn("B", D), two_view_loss, names=("(Linear)",), exact_when=lambda b: b == 1),
    Case("shared-bias-call", WithSharedBias, randn("B", T, T), squared_loss, expect="refused",
         names=("bias", "SharedBias"), exact_when=lambda b: b == 1),
]


class TwoEmbeddings(nn.Module):
    """GPT-2's default positions: a (1, T) index broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(11, D), nn.Embedding(T, D), nn.Linear(D, 2)

    def forward(self, ids):
        return self.out(self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0)))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_exact_or_refused(case: Case, batch: int) -> None:
    check_case(case, batch)


def test_proof_at_one_batch_size_not_reused_at_another():
    """``h + h.roll(2, 0)`` is exact at B = 2 (the roll is the identity) and mixes samples of the
    same parity at B = 4 in the same graph: the proof made at B = 2 must not serve B = 4."""
    torch.manual_seed(0)
    model = Rolled().double()
    clipper = PerSampleClipper(model, 1.0)
    clipper.backward(sq(model(torch.randn(2, D, dtype=torch.float64))))
    with pytest.raises(Refusal, match=r"module a \(Linear\).*samples mixed"):
        clipper.backward(sq(model(torch.randn(4, D, dtype=torch.float64))))


def test_rules_by_exact_class():
    assert rule_for(PlainLinear(3)) is RULES[nn.Linear]
    assert rule_for(Scaled(5, 2)) is None and rule_for(Gained(2, 2)) is None
    assert rule_for(parametrizations.weight_norm(nn.Linear(2, 2))) is None
    lin = nn.Linear(2, 2)
    lin.forward = lambda x: x  # replaced on the instance
    assert rule_for(lin) is None


def test_shared_module_hooked_once():
    model = Shared()
    clipper = PerSampleClipper(model, 1.0)
    assert len(model.proj._forward_hooks) == 1
    clipper.remove()
