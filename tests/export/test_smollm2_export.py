"""SmolLM2 drafts of every algorithm (the session's few-step training runs) exported for both engines.

Each export passes ``deepspec export --check`` for its engine, the engine-semantics drafter reading it
proposes what our drafter proposes, and the launch line is printed.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("algorithm", ["eagle3", "dflash", "dspark"])
def test_smollm2_exports_pass_both_engines_checks(smollm2_trained, tmp_path, capsys, algorithm):
    from deepspec.cli import main
    from deepspec.eval.checkpoints import load_target_and_draft
    from deepspec.export.exporter import export_draft, smoke_test

    recipe, out = smollm2_trained(algorithm)
    target, draft, _ = load_target_and_draft(recipe, str(out), "cpu")
    draft.eval()
    prompt = [target.config.bos_token_id or 1, *range(1000, 1012)]
    printed = []
    for engine in ("sglang", "vllm"):
        smoke = {}

        def gate(folder, engine=engine, smoke=smoke):
            smoke["result"] = smoke_test(target, draft, folder, engine, [prompt], max_new_tokens=16)
            return {"smoke_engine_agreement": smoke["result"].agreement}

        path = export_draft(
            draft, tmp_path / engine, engine, gate=gate, target_model="HuggingFaceTB/SmolLM2-135M"
        )
        assert main(["export", "--check", engine, str(path)]) == 0
        result = smoke["result"]
        assert result.error is None and result.rounds > 0 and result.agreement == 1.0, result
        readme = (path / "README.md").read_text()
        line = readme.split("```\n")[1].strip()
        assert line.startswith("python -m sglang.launch_server" if engine == "sglang" else "vllm serve")
        printed.append(f"{algorithm} {engine}: {result.describe(1.0)}\n  {line}")
    assert "passes every sglang rule" in capsys.readouterr().out
    with capsys.disabled():  # the launch lines, on the terminal
        print("\n" + "\n".join(printed))


def test_export_command_serves_the_alias_from_the_converted_folder(smollm2_trained, tmp_path, capsys):
    """`target.model: smollm2` (the demo's alias) is no model an engine knows: the printed launch line
    names the safetensors folder deepspec converted the GGUF into."""
    import json
    from pathlib import Path

    import yaml

    from deepspec.cli import main
    from deepspec.target_model.files import resolve_model_path

    recipe, out = smollm2_trained("eagle3")
    data = json.loads(recipe.model_dump_json())
    data["target"]["model"] = "smollm2"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    rc = main(["export", "-c", str(path), "--checkpoint", str(out), "--device", "cpu", "--force",
               "--format", "sglang", "--output", str(tmp_path / "export"), "--smoke-tokens", "8"])  # fmt: skip
    assert rc == 0
    line = (tmp_path / "export" / "README.md").read_text().split("```\n")[1].strip()
    served = line.split("--model-path ")[1].split()[0]
    assert served == resolve_model_path("smollm2") and (Path(served) / "config.json").is_file(), line
    assert capsys.readouterr().out.count(served) >= 1
