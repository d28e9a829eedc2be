"""
The study's objective: finetune on new data without forgetting the old.

theta is the model being finetuned; pi is the reference: the same model frozen as it was before
finetuning.
Every step fits the new data and keeps theta's next-token distribution close to pi's on sequences
of the *old* distribution (the replay batch):

    loss = NTP(theta; new batch) + replay_coeff * KL(pi || theta; replay batch)

The replay batch comes from a corpus pi sampled itself (sample_replay.py: prompted with the old
dataset's BOS token, temperature 1, no top-k, never a sequence twice) or from real old data. Two
variants the study compares: NTP instead of KL on the replay batch (fits the sampled tokens only,
not pi's whole distribution), and LwF (the same KL, but on the *new* batch).

Conventions: logits (B, T, V) for tokens (B, T); position t predicts token t+1, so the last position
has no target and is left out of both terms. log-softmax always runs in float32, whatever autocast.
"""
import torch
import torch.nn.functional as F
from torch import nn


def ntp_loss(logits, tokens, mask=None):
    """Next-token prediction: mean cross-entropy of token t+1 under the logits at position t.
    mask (B, T), optional: only the tokens it marks are predicted (e.g. a chat's answer)."""
    V = logits.size(-1)
    if mask is None:
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), tokens[:, 1:].reshape(-1))
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), tokens[:, 1:].reshape(-1),
                             reduction="none")
    return masked_mean(losses, mask)


def kl_loss(logits, reference_logits, mask=None):
    """KL(pi || theta) = sum_v pi(v) (log pi(v) - log theta(v)): summed over the vocabulary, averaged
    over positions. pi is the frozen reference (reference_logits), theta the model being trained
    (logits); the direction matters: it asks theta to cover everything pi would say.
    (F.kl_div with reduction='mean' would also divide by V: wrong.) mask: as in ntp_loss."""
    log_theta = F.log_softmax(logits[:, :-1].float(), dim=-1)
    log_pi = F.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    kl = (log_pi.exp() * (log_pi - log_theta)).sum(-1)
    return kl.mean() if mask is None else masked_mean(kl.reshape(-1), mask)


def masked_mean(values, mask):
    """values: one number per predicted token (B * (T-1)); mask (B, T) marks the tokens that count
    (position t's number is about token t+1, so the mask's first column is never used)."""
    keep = mask[:, 1:].reshape(-1).to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp(min=1)  # a batch without such tokens: 0


class Objective(nn.Module):
    """One training step's loss, as a module so that DistributedDataParallel can wrap it whole
    (it runs the model on the new and the replay batch before one backward):

        NTP(new) + replay_coeff * [KL or NTP](replay) + lwf_coeff * KL(new)

    replay: "kl", "ntp" or "none" (then x_replay is None). mask_new, optional: the new tokens that
    count (answers only); the replay and LwF terms cover every token. The reference is frozen: it
    runs under no_grad and is never updated. Returns the total and its parts (for the log)."""

    def __init__(self, model, reference, replay="kl", replay_coeff=1.0, lwf_coeff=0.0):
        super().__init__()
        self.model, self.reference = model, reference
        self.replay, self.replay_coeff, self.lwf_coeff = replay, replay_coeff, lwf_coeff

    def forward(self, x_new, x_replay=None, mask_new=None):
        logits_new = self.model(x_new)
        loss_new = ntp_loss(logits_new, x_new, mask_new)  # mask_new: train on a chat's answers only
        total, parts = loss_new, {"loss_new": loss_new}
        if x_replay is not None:
            logits_replay = self.model(x_replay)
            if self.replay == "kl":
                with torch.no_grad():
                    reference_logits = self.reference(x_replay)
                parts["loss_replay"] = kl_loss(logits_replay, reference_logits)
            else:
                parts["loss_replay"] = ntp_loss(logits_replay, x_replay)
            total = total + self.replay_coeff * parts["loss_replay"]
        if self.lwf_coeff > 0:
            with torch.no_grad():
                reference_logits = self.reference(x_new)
            parts["loss_lwf"] = kl_loss(logits_new, reference_logits)
            total = total + self.lwf_coeff * parts["loss_lwf"]
        return total, parts


# ----------------------------------------------------------------------------------------------
# the same KL, measured again and again on fixed validation sequences (evaluation): pi's side of
# the sum does not change while theta trains, so it is computed once and kept

def reference_side(reference_logits):
    """pi's part of KL(pi || theta) at every position: (pi, sum_v pi log pi), float32."""
    log_pi = F.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    pi = log_pi.exp()
    return pi, (pi * log_pi).sum(-1)


def kl_from_reference_side(logits, side, mask=None):
    """kl_loss(logits, reference_logits, mask), given side = reference_side(reference_logits):
    the same number up to float rounding, with one log-softmax instead of two and no exp.
    KL = sum_v pi log pi - sum_v pi log theta."""
    pi, pi_log_pi = side
    kl = pi_log_pi - (pi * F.log_softmax(logits[:, :-1].float(), dim=-1)).sum(-1)
    return kl.mean() if mask is None else masked_mean(kl.reshape(-1), mask)
