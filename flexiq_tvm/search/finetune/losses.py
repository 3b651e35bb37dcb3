"""Distillation losses against the FP32 model (torch)."""
from __future__ import annotations


def kl_logits(teacher, student):
    """Mean KL(softmax(teacher) || softmax(student)) over the samples, in nats (last axis = classes)."""
    import torch

    t = teacher.reshape(-1, teacher.shape[-1]).float()
    s = student.reshape(-1, student.shape[-1]).float()
    logp = torch.log_softmax(t, -1)
    return (logp.exp() * (logp - torch.log_softmax(s, -1))).sum(-1).mean()


def relative_mse(teacher, student):
    """Squared error relative to the target's mean square."""
    return ((student - teacher) ** 2).mean() / (teacher.detach() ** 2).mean().clamp_min(1e-12)


def output_loss(teacher, student, is_logits: bool):
    return kl_logits(teacher, student) if is_logits else relative_mse(teacher, student)
