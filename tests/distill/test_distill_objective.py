"""DistillObjective: per-sample KD/CE/cosine losses against direct computations."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from trustml.config import DistillConfig
from trustml.distill.counterfactual import Counterfactual
from trustml.distill.objective import DistillObjective
from trustml.models.lm import student_from_teacher

V = 11
MAP = torch.tensor([1, 0, 3, 2, 4, 5, 6, 7, 8, 9, 10])  # tokens 0<->1 and 2<->3 are "gendered"


def _swap(ids):
    """A stand-in counterfactual: the token involution, every position valid."""
    return Counterfactual(MAP[ids], torch.ones_like(ids, dtype=torch.bool), 0, 0)


def _models():
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_layer=3, n_embd=16, n_head=2,
                                         n_positions=16, resid_pdrop=0, embd_pdrop=0,
                                         attn_pdrop=0)).eval()
    return teacher, student_from_teacher(teacher, [0, 2]).eval()


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # a padded sample
    return {"input_ids": ids, "attention_mask": mask}


def _direct(teacher, student, ids, mask, cfg, target_ids=None):
    """Sample by sample, with F.kl_div / F.cross_entropy, no batching tricks."""
    out = []
    for i in range(len(ids)):
        n = int(mask[i].sum())
        x = ids[i:i + 1, :n]
        s_logits = student(x).logits[0]
        t_logits = teacher(x).logits[0]
        if cfg.perturbation == "logit_mean":
            t_logits = (t_logits + teacher(MAP[x]).logits[0][:, MAP]) / 2
        tau = cfg.temperature
        kd = F.kl_div((s_logits / tau).log_softmax(-1), (t_logits / tau).log_softmax(-1),
                      log_target=True, reduction="none").sum(-1).mean()
        ce = F.cross_entropy(s_logits[:-1], x[0, 1:])
        out.append(cfg.alpha_kd * tau**2 * kd + cfg.alpha_lm * ce)
    return torch.stack(out)


@pytest.mark.parametrize("perturbation", ["none", "logit_mean"])
def test_losses_match_direct_computation(perturbation):
    teacher, student = _models()
    cfg = DistillConfig(alpha_kd=1.0, alpha_lm=0.3, temperature=2.0, perturbation=perturbation)
    batch = _batch()
    out = DistillObjective(teacher, MAP, cfg, _swap)(student, batch)
    assert out.losses.shape == (3,) and out.outputs["logits"].shape == (3, 6, V)
    with torch.no_grad():
        expected = _direct(teacher, student, batch["input_ids"], batch["attention_mask"], cfg)
    assert torch.allclose(out.losses, expected, atol=1e-5)


def test_cda_loss_is_mean_of_original_and_swapped():
    teacher, student = _models()
    cfg = DistillConfig(alpha_kd=1.0, alpha_lm=0.5, cda=True, perturbation="logit_mean")
    batch = _batch()
    both = DistillObjective(teacher, MAP, cfg, _swap)(student, batch).losses
    plain_cfg = cfg.model_copy(update={"cda": False})
    swapped = {"input_ids": MAP[batch["input_ids"]], "attention_mask": batch["attention_mask"]}
    obj = DistillObjective(teacher, MAP, plain_cfg, _swap)
    expected = (obj(student, batch).losses + obj(student, swapped).losses) / 2
    assert torch.allclose(both, expected, atol=1e-6)
    assert both.shape == (3,)


def test_per_sample_losses_do_not_depend_on_the_batch_and_only_student_learns():
    teacher, student = _models()
    cfg = DistillConfig(alpha_kd=1.0, alpha_lm=0.5, alpha_cos=0.2, cda=True,
                        perturbation="prob_mean")
    batch = _batch()
    obj = DistillObjective(teacher, MAP, cfg, _swap)
    full = obj(student, batch).losses
    alone = obj(student, {k: v[2:3] for k, v in batch.items()}).losses
    assert torch.allclose(full[2:3], alone, atol=1e-6)
    full.sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_cosine_term_and_errors():
    teacher, student = _models()
    batch = _batch()
    base = DistillConfig(alpha_kd=0.0, alpha_lm=0.0, alpha_cos=1.0)
    losses = DistillObjective(teacher, MAP, base, _swap)(student, batch).losses
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True).hidden_states[-1]
        t = teacher(**batch, output_hidden_states=True).hidden_states[-1]
    cos = 1 - F.cosine_similarity(s, t, dim=-1)
    m = batch["attention_mask"].float()
    assert torch.allclose(losses, (cos * m).sum(1) / m.sum(1), atol=1e-6)
    with pytest.raises(ValueError, match="vocabulary"):
        DistillObjective(teacher, torch.arange(5), base, _swap)


def test_dp_clipper_sees_one_gradient_per_sample_with_cda():
    """CDA runs the student twice; DP-SGD's per-sample norms must still be those of each
    sample's combined loss (x and sigma(x) together), computed here one sample at a time."""
    from trustml.privacy.clipping import PerSampleClipper

    teacher, student = _models()
    cfg = DistillConfig(alpha_kd=1.0, alpha_lm=0.5, cda=True, perturbation="logit_mean")
    obj = DistillObjective(teacher, MAP, cfg, _swap)
    batch = _batch()
    expected = []
    for i in range(3):
        student.zero_grad()
        obj(student, {k: v[i:i + 1] for k, v in batch.items()}).losses.sum().backward()
        expected.append(torch.sqrt(sum((p.grad**2).sum() for p in student.parameters())))
    student.zero_grad()
    clipper = PerSampleClipper(student, max_grad_norm=1e6)
    norms = clipper.backward(obj(student, batch).losses)
    clipper.remove()
    assert torch.allclose(norms, torch.stack(expected), rtol=1e-4)


def test_unaligned_positions_fall_back_to_the_plain_teacher_and_leave_the_cda_pass():
    """Row 0's counterfactual is invalid from position 3 on: there the KD target is the teacher on
    x alone, and the CDA pass on sigma(x) counts positions 0-2 only."""
    teacher, student = _models()
    batch = _batch()
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, 3:] = False

    def partial(ids):
        return Counterfactual(MAP[ids], valid, 0, 1)

    cfg = DistillConfig(alpha_kd=1.0, alpha_lm=0.0, cda=True, perturbation="prob_mean")
    obj = DistillObjective(teacher, MAP, cfg, partial)
    losses = obj(student, batch).losses
    assert obj.counts == {"swapped_words": 0, "unaligned_words": 1}
    x, sx = batch["input_ids"][:1], MAP[batch["input_ids"][:1]]
    with torch.no_grad():
        t_x, t_sx = teacher(x).logits[0], teacher(sx).logits[0]
        s_x, s_sx = student(x).logits[0], student(sx).logits[0]
    mixed = ((t_x.softmax(-1) + t_sx[:, MAP].softmax(-1)) / 2).log()
    target_x = torch.cat([mixed[:3], t_x[3:].log_softmax(-1)])
    mixed_s = ((t_sx.softmax(-1) + t_x[:, MAP].softmax(-1)) / 2).log()
    tau = cfg.temperature

    def kl(student_logits, target):
        return F.kl_div((student_logits / tau).log_softmax(-1), (target / tau).log_softmax(-1),
                        log_target=True, reduction="none").sum(-1)

    expected = (tau**2 * kl(s_x, target_x).mean() + tau**2 * kl(s_sx, mixed_s)[:3].mean()) / 2
    assert torch.allclose(losses[0], expected, atol=1e-5)


def test_teacher_logits_are_float32_under_autocast():
    teacher, student = _models()
    cfg = DistillConfig(alpha_kd=1.0, perturbation="logit_mean")
    obj = DistillObjective(teacher, MAP, cfg, _swap)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = obj._teacher_logits(_batch()["input_ids"], _batch()["attention_mask"], False)
        assert teacher(_batch()["input_ids"]).logits.dtype == torch.bfloat16
        losses = obj(student, _batch()).losses
    assert logits.dtype == torch.float32 and torch.isfinite(losses).all()
