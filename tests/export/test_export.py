"""Export round-trips for every algorithm x format, and loud failures on broken exports."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepspec.config import draft_model_config
from deepspec.export.engines import ConformanceError
from deepspec.export.exporter import export_draft, validate_export
from deepspec.export.formats import ExportError
from deepspec.testing.tiny import tiny_target

CASES = [
    ("eagle3", {}),
    ("eagle3", {"draft_vocab_size": 64}),
    ("dflash", {"num_layers": 2}),
    ("dspark", {"num_layers": 2}),
    ("dspark", {"num_layers": 2, "confidence_head": False}),
]


def make(algorithm, **kwargs):
    from deepspec.models import build_draft
    from deepspec.target_model.model import default_layer_ids

    target = tiny_target("qwen3", layer_ids=default_layer_ids(4, algorithm))
    torch.manual_seed(0)
    return target, build_draft(draft_model_config(algorithm=algorithm, **kwargs), target)


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
@pytest.mark.parametrize(("algorithm", "kwargs"), CASES)
def test_round_trip(tmp_path, algorithm, kwargs, fmt):
    target, draft = make(algorithm, **kwargs)
    out = export_draft(draft, tmp_path / "export", fmt, provenance={"source_checkpoint": "x"})
    cfg = validate_export(out, fmt)
    weights = load_file(str(out / "model.safetensors"))
    own = {k: v for k, v in draft.trainable_state_dict().items() if k in weights}
    for name, tensor in own.items():  # values survive (bf16 rounding for floats)
        if tensor.is_floating_point():
            torch.testing.assert_close(weights[name].float(), tensor.float(), atol=1e-2, rtol=1e-2)
        else:
            assert torch.equal(weights[name], tensor.cpu())
    assert not any("embed_tokens" in k for k in weights)
    ids = target.layer_ids
    if algorithm == "eagle3":
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
        assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == ids
        assert cfg["draft_vocab_size"] == kwargs.get("draft_vocab_size", target.vocab_size)
        assert weights["lm_head.weight"].shape == (cfg["draft_vocab_size"], target.hidden_size)
        assert weights["d2t"].dtype == torch.int64 and weights["t2d"].dtype == torch.bool
        assert cfg["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in ids]  # both engines, always
    else:
        assert cfg["dflash_config"]["target_layer_ids"] == ids
        assert cfg["dflash_config"]["block_size"] == {"dflash": 8, "dspark": 7}[algorithm]
        assert "mask_token_id" in cfg["dflash_config"] and "lm_head.weight" not in weights
        if algorithm == "dspark":
            arch = {"sglang": "DSparkDraftModel", "vllm": "Qwen3DSparkModel"}[fmt]
            assert cfg["architectures"] == [arch] and cfg["markov_rank"] == 256
            assert {"markov_head.markov_w1.weight", "markov_head.markov_w2.weight"} <= set(weights)
            has_conf = kwargs.get("confidence_head", True)
            assert cfg["enable_confidence_head"] is has_conf and cfg["confidence_head_with_markov"] is True
            assert ("confidence_head.proj.weight" in weights) == has_conf
            if has_conf:
                assert (
                    weights["confidence_head.proj.weight"].dtype == torch.float32
                )  # as the engines allocate
    readme = (out / "README.md").read_text()
    assert ("sglang.launch_server" if fmt == "sglang" else "vllm serve") in readme


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
@pytest.mark.parametrize("head", ["rnn", "none"])
def test_unservable_markov_heads_are_refused_naming_the_engine(tmp_path, fmt, head):
    _, draft = make("dspark", num_layers=1, markov_head=head)
    with pytest.raises(ExportError, match=rf"{fmt} cannot serve a DSpark draft with markov_head '{head}'"):
        export_draft(draft, tmp_path / "x", fmt)
    assert not (tmp_path / "x").exists()


def _corrupt(out, fn):
    path = out / "model.safetensors"
    weights = load_file(str(path))
    fn(weights)
    save_file(weights, str(path))


def test_missing_and_misnamed_tensors_fail_loudly(tmp_path):
    _, draft = make("eagle3")
    out = export_draft(draft, tmp_path / "e", "sglang")
    _corrupt(out, lambda w: w.pop("midlayer.self_attn.k_proj.weight"))
    with pytest.raises(ConformanceError, match=r"missing tensor midlayer\.self_attn\.k_proj\.weight"):
        validate_export(out, "sglang")

    out = export_draft(draft, tmp_path / "f", "sglang")
    _corrupt(out, lambda w: w.__setitem__("midlayer.fc.weight", w.pop("fc.weight")))
    with pytest.raises(
        ConformanceError, match=r"missing tensor fc\.weight[\s\S]*unexpected tensor midlayer\.fc\.weight"
    ):
        validate_export(out, "sglang")

    out = export_draft(draft, tmp_path / "g", "sglang")
    _corrupt(out, lambda w: w.__setitem__("norm.weight", torch.ones(3)))
    with pytest.raises(ConformanceError, match=r"norm\.weight has shape \(3,\)"):
        validate_export(out, "sglang")


def test_wrong_config_field_fails(tmp_path):
    _, draft = make("dflash", num_layers=2)
    out = export_draft(draft, tmp_path / "d", "sglang")
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConformanceError, match="architectures"):
        validate_export(out, "sglang")


def test_draft_with_a_misnamed_parameter_is_not_exported(tmp_path):
    _, draft = make("eagle3")
    state = draft.trainable_state_dict()
    state["fc_typo.weight"] = state.pop("fc.weight")
    draft.trainable_state_dict = lambda: state  # type: ignore[method-assign]
    with pytest.raises(ExportError, match="fc_typo"):
        export_draft(draft, tmp_path / "x", "sglang")
    assert not (tmp_path / "x").exists()
