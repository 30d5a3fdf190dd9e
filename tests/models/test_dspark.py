"""DSpark: Markov bias == W2 W1[x], RNN head, sequential sampling == training, loss composition."""

from __future__ import annotations

import pytest
import torch

from deepspec.models.dspark import MarkovHead

from .draft_helpers import make_batch, make_draft


def test_markov_bias_equals_w2_w1():
    torch.manual_seed(0)
    head = MarkovHead(vocab_size=50, rank=8, kind="vanilla")
    torch.nn.init.normal_(head.markov_w2.weight)  # zero at init; make it non-trivial
    x = torch.randint(0, 50, (3, 7))
    bias = head.bias(head.states(x))
    expected = torch.einsum("vr,bkr->bkv", head.markov_w2.weight, head.markov_w1.weight[x])
    torch.testing.assert_close(bias, expected)
    assert bias.shape == (3, 7, 50)


def test_markov_head_starts_neutral_and_rnn_state_is_recurrent():
    torch.manual_seed(0)
    assert torch.all(MarkovHead(50, 8, "vanilla").bias(torch.randn(4, 8)) == 0)
    rnn = MarkovHead(50, 8, "rnn")
    x = torch.randint(0, 50, (2, 5))
    states = rnn.states(x)
    s = torch.zeros(2, 8)
    for k in range(5):
        s = rnn.rnn(rnn.markov_w1(x[:, k]), s)
        torch.testing.assert_close(states[:, k], s)
    x2 = x.clone()
    x2[:, 0] = (x2[:, 0] + 1) % 50  # changing an early token changes every later state
    assert not torch.allclose(rnn.states(x2)[:, -1], states[:, -1])
    with pytest.raises(ValueError, match="markov_head"):
        MarkovHead(50, 8, "lstm")


@pytest.mark.parametrize("kind", ["vanilla", "rnn"])
def test_sequential_head_training_equals_inference(llama_target, kind):
    target = llama_target
    draft = make_draft("dspark", target, markov_head=kind).eval()
    with torch.no_grad():
        torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=0.5)
    batch = make_batch(target, batch=1, seq=20, pad=False)
    ids, feats = batch.input_ids[0], batch.features[0]
    anchors = torch.tensor([[4, 10]])
    with torch.no_grad():
        out = draft.block_forward(batch, anchors, torch.ones_like(anchors, dtype=torch.bool))
        logits = draft.target_lm_head(out.hidden[0]) + draft.markov_head.bias(
            draft.markov_head.states(out.prev_tokens[0])
        )
    drafter = draft.as_drafter(target)
    for n, a in enumerate(anchors[0].tolist()):
        drafter.reset()
        drafter.extend(ids[:a], feats[:a])
        slow = drafter.teacher_forced_logits(int(ids[a]), ids[a + 1 : a + 8].tolist())
        torch.testing.assert_close(logits[n], slow, rtol=1e-4, atol=1e-4)
    # greedy proposals follow the head left to right: slot k's bias uses the proposal of slot k-1
    drafter.reset()
    drafter.extend(ids[:10], feats[:10])
    p = drafter.propose(int(ids[10]), 7, 0.0)
    forced = drafter.teacher_forced_logits(int(ids[10]), p.tokens.tolist())
    assert torch.equal(forced.argmax(-1), p.tokens)


def test_loss_is_weighted_sum_of_terms(llama_target):
    target = llama_target
    batch = make_batch(target)
    anchors = torch.tensor([[6, 9, 12], [7, 10, 11]])
    draft = make_draft("dspark", target)
    out = draft(batch, anchors=anchors)
    m = out.metrics
    torch.testing.assert_close(
        out.loss.item(), 0.1 * m["ce"] + 0.9 * m["l1"] + 1.0 * m["bce"], rtol=1e-5, atol=1e-6
    )
    draft2 = make_draft("dspark", target, loss_weights={"ce": 1.0, "l1": 0.0, "bce": 0.0})
    out2 = draft2(batch, anchors=anchors)
    torch.testing.assert_close(out2.loss, torch.tensor(out2.metrics["ce"]))
    # L1 = 2 TV, and the confidence target is 1 - TV = the reported per-position acceptance
    assert 0 <= m["l1"] <= 2
    with pytest.raises(ValueError, match="loss_weights"):
        make_draft("dspark", target, loss_weights={"kl": 1.0})


def test_confidence_head_can_be_disabled(llama_target):
    draft = make_draft("dspark", llama_target, confidence_head=False, markov_head="none")
    out = draft(make_batch(llama_target))
    assert "bce" not in out.metrics and torch.isfinite(out.loss)
    drafter = draft.eval().as_drafter(llama_target)
    batch = make_batch(llama_target, batch=1, seq=12, pad=False)
    drafter.extend(batch.input_ids[0, :8], batch.features[0, :8])
    assert drafter.propose(int(batch.input_ids[0, 8]), 3, 0.0).confidence is None
