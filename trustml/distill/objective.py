"""Knowledge distillation with counterfactual role reversal, as a per-sample Objective.

Per sample x (per ARCHITECTURE.md, losses are (B,), never reduced over the batch, so DP-SGD can clip
them): alpha_kd * tau^2 * KL(teacher_target || student) + alpha_lm * CE + alpha_cos * (1 - cos) of
the last hidden states, each averaged over the sample's real (non-padded) positions.

- sigma(x) is :func:`~trustml.distill.counterfactual.counterfactual_ids` (whole words, in context,
  position for position). Where a gendered word could not be swapped token for token, sigma(x)
  is no counterfactual from that word on: there the target is the plain teacher on x and the
  student's CDA pass on sigma(x) is masked out (``DistillObjective.counts`` says how often).
- Perturbation: teacher_target = perturb_teacher_logits(z(x), z(sigma(x)), sigma_vocab, mode):
  the teacher's logits are taken in float32 (also under autocast), then combined; the
  temperature is applied to the combined logits.
- CDA: the student also trains on sigma(x). It runs x and sigma(x) as two forward passes and the
  sample's loss is the mean of both, so sample i still owns exactly one loss (and one per-sample
  gradient: Opacus accumulates grad samples over the two passes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from trustml.config import Config, ConfigError, DistillConfig
from trustml.distill.counterfactual import (
    Counterfactual,
    gender_token_map,
    perturb_teacher_logits,
    token_swapper,
)
from trustml.training.objectives import ObjectiveOutput, token_losses


def kd_token_losses(student_logits: torch.Tensor, target_logits: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """KL(softmax(target/tau) || softmax(student/tau)) per position, shape (B, T)."""
    log_q = (student_logits.float() / temperature).log_softmax(-1)
    log_p = (target_logits.float() / temperature).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class DistillObjective:
    """``(student, batch) -> ObjectiveOutput`` against a frozen ``teacher`` (see module doc)."""

    def __init__(self, teacher: nn.Module, token_map: torch.Tensor, cfg: DistillConfig,
                 counterfactual: Callable[[torch.Tensor], Counterfactual]) -> None:
        if token_map.ndim != 1 or token_map.numel() != teacher.config.vocab_size:
            raise ValueError(
                f"token_map has {token_map.numel()} entries; the teacher's vocabulary has "
                f"{teacher.config.vocab_size}"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.token_map, self.cfg, self.counterfactual = token_map, cfg, counterfactual
        self.counts = {"swapped_words": 0, "unaligned_words": 0}

    def _teacher_logits(self, ids: torch.Tensor, mask: torch.Tensor, hidden: bool):
        """Teacher logits in float32 (under autocast the forward may run in bf16/fp16, but the
        perturbation and the KL target are computed at full precision)."""
        if next(self.teacher.parameters()).device != ids.device:
            self.teacher.to(ids.device)
        with torch.no_grad():
            out = self.teacher(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        return out.logits.float(), (out.hidden_states[-1] if hidden else None)

    def _sample_losses(self, student: nn.Module, ids, mask, target, teacher_hidden):
        cfg = self.cfg
        out = student(input_ids=ids, attention_mask=mask, output_hidden_states=cfg.alpha_cos > 0)
        logits = out.logits
        losses = torch.zeros(ids.shape[0], device=ids.device)
        if cfg.alpha_kd > 0:
            kd = kd_token_losses(logits, target, cfg.temperature)
            losses = losses + cfg.alpha_kd * cfg.temperature**2 * _masked_mean(kd, mask)
        if cfg.alpha_lm > 0:
            ce, keep = token_losses(logits, ids, mask)
            losses = losses + cfg.alpha_lm * _masked_mean(ce, keep)
        if cfg.alpha_cos > 0:
            student_hidden = out.hidden_states[-1]
            if student_hidden.shape != teacher_hidden.shape:
                raise ConfigError("distill.alpha_cos needs student and teacher of equal n_embd")
            cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
            losses = losses + cfg.alpha_cos * _masked_mean(1 - cos, mask)
        return losses, logits

    def __call__(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        cfg = self.cfg
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        need_swapped_teacher = cfg.cda or cfg.perturbation != "none"
        if not need_swapped_teacher:
            t_logits, t_hidden = self._teacher_logits(ids, mask, cfg.alpha_cos > 0)
            losses, logits = self._sample_losses(student, ids, mask, t_logits, t_hidden)
            return ObjectiveOutput(losses, {"logits": logits})
        cf = self.counterfactual(ids)
        self.counts["swapped_words"] += cf.swapped
        self.counts["unaligned_words"] += cf.unaligned
        swapped, valid = cf.ids.to(ids.device), cf.valid.to(ids.device)
        t_logits, t_hidden = self._teacher_logits(
            torch.cat([ids, swapped]), torch.cat([mask, mask]), cfg.alpha_cos > 0)
        n = ids.shape[0]
        if cfg.perturbation != "none":
            # row i of the second half is sigma(x_i): each half is the other's counterfactual
            t_swapped = torch.cat([t_logits[n:], t_logits[:n]])
            perturbed = perturb_teacher_logits(t_logits, t_swapped, self.token_map,
                                               cfg.perturbation, cfg.perturb_only_gendered)
            keep = torch.cat([valid, valid])[..., None]
            t_logits = torch.where(keep, perturbed, t_logits.log_softmax(-1))
        hid = (lambda part: t_hidden[part]) if t_hidden is not None else (lambda part: None)
        losses, logits = self._sample_losses(student, ids, mask, t_logits[:n], hid(slice(0, n)))
        if cfg.cda:
            swapped_mask = mask * valid.to(mask.dtype)
            swapped_losses, _ = self._sample_losses(
                student, swapped, swapped_mask, t_logits[n:], hid(slice(n, 2 * n))
            )
            losses = (losses + swapped_losses) / 2
        return ObjectiveOutput(losses, {"logits": logits})


def load_teacher(name_or_path: str, revision: str | None = None) -> nn.Module:
    from trustml.models.lm import load_pretrained

    return load_pretrained(name_or_path, "distill.teacher", revision)


def build_distillation(config: Config, tokenizer: PreTrainedTokenizerBase):
    """(student, DistillObjective) for ``config.distill``: the teacher is ``distill.teacher``
    (hub name or local folder); the student is cut from its ``student_layers`` or, when those are
    unset, built from ``config.model``."""
    from trustml.models.lm import build_lm, student_from_teacher

    cfg = config.distill
    if cfg.teacher is None:
        raise ConfigError("distill.enabled needs distill.teacher (a hub name or a local folder)")
    teacher = load_teacher(cfg.teacher, cfg.teacher_revision)
    if cfg.student_layers is not None:
        student = student_from_teacher(teacher, cfg.student_layers, config.model.dropout)
    else:
        student = build_lm(config.model, teacher.config.vocab_size)
    token_map = gender_token_map(tokenizer)
    if token_map.numel() < teacher.config.vocab_size:  # padded embedding tables map to themselves
        token_map = torch.cat([token_map, torch.arange(token_map.numel(), teacher.config.vocab_size)])
    return student, DistillObjective(teacher, token_map, cfg, token_swapper(tokenizer))
