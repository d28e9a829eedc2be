"""The study's objective (objective.py) against float64 computations written out by hand."""
import torch
from torch import nn

from objective import Objective, kl_loss


# --- KL(reference || model) ---------------------------------------------------------------------

def test_kl_is_zero_when_the_model_equals_the_reference():
    logits = torch.randn(3, 6, 11)
    assert kl_loss(logits, logits.clone()).abs().item() < 1e-6
    assert kl_loss(logits + 1.0, logits).abs().item() < 1e-6  # a constant shift is the same distribution


def test_kl_value_and_gradient_match_a_float64_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 13, requires_grad=True)
    reference_logits = torch.randn(2, 5, 13)
    kl_loss(logits, reference_logits).backward()

    l64 = logits.detach().double().requires_grad_(True)
    p = torch.softmax(reference_logits.double()[:, :-1], -1)
    expected = (p * (p.log() - torch.log_softmax(l64[:, :-1], -1))).sum(-1).mean()  # sum over vocab
    expected.backward()
    assert abs(kl_loss(logits, reference_logits).item() - expected.item()) < 1e-6
    assert torch.allclose(logits.grad.double(), l64.grad, atol=1e-7)
    assert logits.grad[:, -1].abs().max() == 0  # last position masked, as in the NTP loss


def test_evaluation_kl_from_the_reference_side_kept_between_calls_is_the_same_kl():
    """Evaluation keeps pi's side of the sum (pi and sum pi log pi) for its fixed windows and
    measures sum pi log pi - sum pi log theta: kl_loss's number, float64 by hand, with and without
    a mask; and exactly 0 when theta is pi."""
    from objective import kl_from_reference_side, reference_side
    torch.manual_seed(2)
    logits, reference_logits = torch.randn(3, 7, 17) * 3, torch.randn(3, 7, 17) * 3
    mask = torch.rand(3, 7) > 0.4
    side = reference_side(reference_logits)
    p = torch.softmax(reference_logits.double()[:, :-1], -1)
    per_position = (p * (p.log() - torch.log_softmax(logits.double()[:, :-1], -1))).sum(-1)
    marked = mask[:, 1:]
    assert abs(kl_from_reference_side(logits, side).item() - per_position.mean().item()) < 1e-6
    assert abs(kl_from_reference_side(logits, side, mask).item() - per_position[marked].mean().item()) < 1e-6
    assert abs(kl_from_reference_side(logits, side).item() - kl_loss(logits, reference_logits).item()) < 1e-6
    assert kl_from_reference_side(reference_logits, side).item() == 0.0


# --- the whole objective -------------------------------------------------------------------------

class FixedLogits(nn.Module):
    """A stand-in model: logits from a table indexed by token, so a test knows them exactly."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, x):
        return self.table[x]


def objective_in_float64(model_table, reference_table, x_new, x_replay, replay, replay_coeff, lwf_coeff):
    """The objective in float64, term by term: NTP as -log theta(next token), KL as
    sum_v pi(v) (log pi(v) - log theta(v)), each averaged over every position that has a next token."""
    log_theta = torch.log_softmax(model_table.double(), -1)
    log_pi = torch.log_softmax(reference_table.double(), -1)

    def ntp(x):
        return torch.stack([-log_theta[x[b, t], x[b, t + 1]] for b in range(len(x)) for t in range(x.size(1) - 1)]).mean()

    def kl(x):
        rows = [(log_pi[x[b, t]].exp() * (log_pi[x[b, t]] - log_theta[x[b, t]])).sum()
                for b in range(len(x)) for t in range(x.size(1) - 1)]
        return torch.stack(rows).mean()

    total = ntp(x_new)
    if x_replay is not None:
        total = total + replay_coeff * (kl(x_replay) if replay == "kl" else ntp(x_replay))
    if lwf_coeff:
        total = total + lwf_coeff * kl(x_new)
    return total


def test_objective_matches_a_float64_computation_of_every_term():
    torch.manual_seed(0)
    V = 7
    model_table, reference_table = torch.randn(V, V), torch.randn(V, V)
    x_new, x_replay = torch.randint(0, V, (3, 6)), torch.randint(0, V, (2, 6))
    cases = [("kl", 1.0, 0.0), ("kl", 3.0, 0.0), ("ntp", 2.0, 0.0), ("kl", 1.0, 0.5), ("none", 0.0, 1.0)]
    for replay, replay_coeff, lwf_coeff in cases:
        model, reference = FixedLogits(model_table.clone()), FixedLogits(reference_table.clone())
        reference.requires_grad_(False)
        objective = Objective(model, reference, replay, replay_coeff, lwf_coeff)
        replay_batch = None if replay == "none" else x_replay
        loss, parts = objective(x_new, replay_batch)
        loss.backward()

        table64 = model_table.double().requires_grad_(True)
        expected = objective_in_float64(table64, reference_table, x_new, replay_batch, replay, replay_coeff, lwf_coeff)
        expected.backward()
        assert abs(loss.item() - expected.item()) < 1e-5, (replay, replay_coeff, lwf_coeff)
        assert torch.allclose(model.table.grad.double(), table64.grad, atol=1e-6)
        assert reference.table.grad is None  # the frozen model never gets a gradient
        assert set(parts) == {"loss_new"} | ({"loss_replay"} if replay_batch is not None else set()) \
            | ({"loss_lwf"} if lwf_coeff else set())


def test_a_mask_restricts_both_terms_to_the_tokens_it_marks():
    """A chat's answer: only the marked tokens are predicted (NTP) or matched (KL); float64 by hand."""
    from objective import ntp_loss
    torch.manual_seed(1)
    logits, reference_logits = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    tokens = torch.randint(0, 9, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    log_theta, log_pi = torch.log_softmax(logits.double(), -1), torch.log_softmax(reference_logits.double(), -1)
    marked = [(b, t) for b in range(2) for t in range(5) if mask[b, t + 1]]  # position t predicts token t + 1
    ntp = torch.stack([-log_theta[b, t, tokens[b, t + 1]] for b, t in marked]).mean()
    kl = torch.stack([(log_pi[b, t].exp() * (log_pi[b, t] - log_theta[b, t])).sum() for b, t in marked]).mean()
    assert abs(ntp_loss(logits, tokens, mask).item() - ntp.item()) < 1e-5
    assert abs(kl_loss(logits, reference_logits, mask).item() - kl.item()) < 1e-5
    everything = torch.ones_like(mask)
    assert abs(ntp_loss(logits, tokens, everything).item() - ntp_loss(logits, tokens).item()) < 1e-6
