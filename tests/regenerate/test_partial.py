"""`deepspec regenerate --partial`: train on a regeneration that has not finished, then finish it.

A GPU comes in time slots; a regeneration that does not fit one must still give a usable file of what
it finished, and the journal must let a later slot finish the rest without sending a finished record
again.
"""

from __future__ import annotations

import json
from pathlib import Path

from deepspec.cli import main

from .conftest import prompts, read_jsonl, write_records

N = 24


def _keep_journal_lines(journal: Path, records: int) -> set[str]:
    """Cut the journal back to its header and its first ``records`` entries (as a killed run leaves it)."""
    lines = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    journal.write_text("".join(lines[: 1 + records]), encoding="utf-8")
    return {json.loads(line)["id"] for line in lines[1 : 1 + records]}


def test_partial_writes_the_finished_records_then_a_rerun_finishes_the_rest(tmp_path: Path, stub) -> None:
    server = stub(request_log=str(tmp_path / "requests.jsonl"))
    inp = write_records(tmp_path / "in.jsonl", prompts(N))
    out = tmp_path / "out" / "regen.jsonl"
    argv = ["regenerate", "--input", str(inp), "--output", str(out), "--quiet",
            "--set", "regeneration.sampling.seed=1", "--set", "regeneration.sampling.max_tokens=64"]  # fmt: skip
    assert main([*argv, "--endpoint", server.base_url]) == 0
    full = {r["id"]: r for r in read_jsonl(out)}
    finished = _keep_journal_lines(tmp_path / "out" / "regen.journal.jsonl", 10)
    out.unlink()
    sent_before = len((tmp_path / "requests.jsonl").read_text().splitlines())

    # No endpoint and no embedded server: --partial sends nothing.
    assert main([*argv, "--partial"]) == 0
    partial = read_jsonl(out)
    assert {r["id"] for r in partial} == finished
    assert [r["index"] for r in partial] == sorted(r["index"] for r in partial), "input order"
    assert all(r == full[r["id"]] for r in partial), "the journal's records, unchanged"
    summary = json.loads((tmp_path / "out" / "regen.summary.json").read_text())
    assert summary["partial"] is True and summary["unfinished"] == N - 10
    assert summary["input"] == 10 and summary["invariant_holds"]
    assert summary["finished_this_run"] == 0 and summary["resumed_from_journal"] == 10
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == sent_before

    # The same command without --partial finishes the rest and sends no finished record again.
    assert main([*argv, "--endpoint", server.base_url]) == 0
    assert [r["id"] for r in read_jsonl(out)] == [f"r{i}" for i in range(N)]
    resent = [json.loads(line)["key"].split("#")[0]
              for line in (tmp_path / "requests.jsonl").read_text().splitlines()[sent_before:]]  # fmt: skip
    assert sorted(resent) == sorted(set(full) - finished)
    summary = json.loads((tmp_path / "out" / "regen.summary.json").read_text())
    assert summary["partial"] is False and summary["ok"] == N
