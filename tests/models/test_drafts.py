"""Properties every draft must have (Eagle3, DFlash, DSpark on tiny random Llama and Qwen3 targets)."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import save_file

from deepspec.models import load_draft
from deepspec.models.base import Proposal, SpeculativeDrafter

from .draft_helpers import ALGORITHMS, make_batch, make_draft


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_forward_and_loss_are_finite(target, algorithm):
    draft = make_draft(algorithm, target)
    out = draft(make_batch(target))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.loss.requires_grad
    assert all(isinstance(v, float) for v in out.metrics.values())
    g = draft.cfg.ttt_steps if algorithm == "eagle3" else draft.proposals_per_block
    assert out.position_acceptance.shape == (g,)
    assert torch.all((out.position_acceptance > 0) & (out.position_acceptance <= 1))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradients_reach_only_trainable_parameters(target, algorithm):
    draft = make_draft(algorithm, target)
    draft(make_batch(target)).loss.backward()
    target_params = {id(p) for p in target.parameters()}
    assert not target_params & {id(p) for p in draft.parameters()}, "target weights registered in the draft"
    assert all(p.grad is None for p in target.parameters()), "a frozen target weight received a gradient"
    no_grad = [n for n, p in draft.named_parameters() if p.grad is None]
    assert not no_grad, f"draft parameters without gradient: {no_grad}"
    assert any(p.grad.abs().sum() > 0 for p in draft.parameters())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_frozen_embedding_and_lm_head_unchanged_by_an_optimizer_step(llama_target, algorithm):
    target = llama_target
    before = {k: v.clone() for k, v in target.state_dict().items()}
    draft = make_draft(algorithm, target)
    draft_before = {k: v.clone() for k, v in draft.state_dict().items()}
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        draft(make_batch(target)).loss.backward()
        opt.step()
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "target weights changed"
    assert torch.equal(target.embed_tokens.weight, before[next(k for k in before if "embed_tokens" in k)])
    changed = [k for k, v in draft.state_dict().items() if not torch.equal(v, draft_before[k])]
    assert changed, "the optimizer step did not change the draft"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_trainable_state_dict_excludes_target_weights(llama_target, algorithm):
    draft = make_draft(algorithm, llama_target)
    sd = draft.trainable_state_dict()
    assert not any("embed_tokens" in k for k in sd)
    target_ptrs = {p.data_ptr() for p in llama_target.parameters()}
    assert not target_ptrs & {v.data_ptr() for v in sd.values()}
    if algorithm == "eagle3":  # its own (trainable) LM head over the draft vocabulary, SGLang layout
        assert {
            "fc.weight",
            "midlayer.self_attn.q_proj.weight",
            "midlayer.hidden_norm.weight",
            "norm.weight",
            "lm_head.weight",
            "d2t",
            "t2d",
        } <= set(sd)
        assert sd["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * llama_target.hidden_size
    else:  # DFlash / DSpark use the target's LM head: not saved
        assert not any(k.startswith("lm_head") for k in sd)
        assert {"fc.weight", "hidden_norm.weight", "layers.0.self_attn.k_norm.weight", "norm.weight"} <= set(
            sd
        )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_drafter_shapes_and_greedy_determinism(target, algorithm):
    draft = make_draft(algorithm, target).eval()
    drafter = draft.as_drafter(target)
    assert isinstance(drafter, SpeculativeDrafter)
    batch = make_batch(target, batch=1, seq=16, pad=False)
    ids, feats = batch.input_ids[0], batch.features[0]
    drafter.reset()
    drafter.extend(ids[:12], feats[:12])
    p1 = drafter.propose(int(ids[12]), 5, 0.0)
    p2 = drafter.propose(int(ids[12]), 5, 0.0)
    assert isinstance(p1, Proposal)
    assert p1.tokens.shape == (5,) and p1.tokens.dtype == torch.long
    assert p1.probs.shape == (5, target.vocab_size)
    assert torch.equal(p1.tokens, p2.tokens) and torch.equal(p1.probs, p2.probs)
    assert torch.equal(p1.probs.argmax(-1), p1.tokens) and torch.all(p1.probs.sum(-1) == 1)
    if algorithm == "dspark":
        assert p1.confidence is not None and p1.confidence.shape == (5,)
        assert torch.all((p1.confidence > 0) & (p1.confidence < 1))
    # sampling: a distribution per slot, reproducible with the same seed
    s1 = drafter.propose(int(ids[12]), 5, 1.0, torch.Generator().manual_seed(3))
    s2 = drafter.propose(int(ids[12]), 5, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(s1.tokens, s2.tokens)
    assert torch.allclose(s1.probs.sum(-1), torch.ones(5), atol=1e-5)
    assert torch.all(s1.probs[torch.arange(5), s1.tokens] > 0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_incremental_drafter_equals_drafter_from_scratch(target, algorithm):
    """Rounds of extend + propose (the engine's pattern) give what a fresh drafter gives on the whole context."""
    draft = make_draft(algorithm, target).eval()
    batch = make_batch(target, batch=1, seq=20, pad=False)
    ids, feats = batch.input_ids[0], batch.features[0]
    inc = draft.as_drafter(target)
    inc.reset()
    inc.extend(ids[:8], feats[:8])
    inc.propose(int(ids[8]), 4, 0.0)  # speculative work must not leak into the committed context
    inc.propose(int(ids[8]), 4, 1.0, torch.Generator().manual_seed(0))
    inc.extend(ids[8:13], feats[8:13])  # anchor + accepted tokens of round 1
    inc.propose(int(ids[13]), 4, 0.0)
    inc.extend(ids[13:15], feats[13:15])
    got = inc.propose(int(ids[15]), 6, 0.0)

    scratch = draft.as_drafter(target)
    scratch.reset()
    scratch.extend(ids[:15], feats[:15])
    ref = scratch.propose(int(ids[15]), 6, 0.0)
    assert torch.equal(got.tokens, ref.tokens)
    assert torch.equal(got.probs, ref.probs)
    # and the logits agree to float precision
    for d in (inc, scratch):
        d.reset()
    inc.extend(ids[:8], feats[:8])
    inc.extend(ids[8:15], feats[8:15])
    scratch.extend(ids[:15], feats[:15])
    if algorithm == "eagle3":
        a = inc.teacher_forced_logits(int(ids[15]), ids[16:19].tolist())
        b = scratch.teacher_forced_logits(int(ids[15]), ids[16:19].tolist())
    else:
        a, b = inc.block_logits(int(ids[15])), scratch.block_logits(int(ids[15]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    inc.reset()
    with pytest.raises(RuntimeError) if algorithm == "eagle3" else nullcontext():
        inc.propose(int(ids[0]), 3, 0.0)  # eagle3 needs a committed feature; DFlash can draft from nothing


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_load_draft_round_trip(llama_target, algorithm, tmp_path):
    draft = make_draft(algorithm, llama_target)
    with torch.no_grad():  # make every weight distinctive (zero-initialised heads included)
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    (tmp_path / "config.json").write_text(json.dumps(draft.draft_config()))
    save_file(
        {k: v.contiguous() for k, v in draft.trainable_state_dict().items()},
        str(tmp_path / "model.safetensors"),
    )
    loaded = load_draft(tmp_path, llama_target)
    assert type(loaded) is type(draft)
    sd, sd2 = draft.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    batch = make_batch(llama_target, batch=1, seq=12, pad=False)
    outs = []
    for m in (draft, loaded):
        d = m.eval().as_drafter(llama_target)
        d.extend(batch.input_ids[0, :10], batch.features[0, :10])
        outs.append(d.propose(int(batch.input_ids[0, 10]), 4, 0.0))
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    # a tensor missing from the checkpoint fails loudly
    state = {k: v.contiguous() for k, v in draft.trainable_state_dict().items()}
    state.pop(next(iter(state)))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_draft(tmp_path, llama_target)


def test_draft_configs_carry_serving_fields(llama_target):
    e = make_draft("eagle3", llama_target).draft_config()
    assert e["architectures"] == ["LlamaForCausalLMEagle3"]
    assert e["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert e["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # vLLM's top-level key, +1 shifted
    assert e["draft_vocab_size"] == llama_target.vocab_size and e["num_hidden_layers"] == 1
    f = make_draft("dflash", llama_target).draft_config()
    assert f["architectures"] == ["DFlashDraftModel"] and f["block_size"] == 8
    assert f["dflash_config"]["target_layer_ids"] == [0, 1, 2] and "mask_token_id" in f
    s = make_draft("dspark", llama_target).draft_config()
    assert s["markov_rank"] == 16 and s["markov_head_type"] == "vanilla" and s["enable_confidence_head"]
    json.dumps([e, f, s])  # plain JSON


def test_old_convention_dflash_checkpoint_is_refused(llama_target, tmp_path):
    draft = make_draft("dflash", llama_target)
    cfg = draft.draft_config()
    cfg["deepspec"].pop("slot_convention")  # a checkpoint written before the engines' convention
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.contiguous() for k, v in draft.trainable_state_dict().items()},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(ValueError, match="retrain it"):
        load_draft(tmp_path, llama_target)
