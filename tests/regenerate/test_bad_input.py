"""Acceptance 4: bad lines never abort a run; each is reported with its line number and reason."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import read_jsonl, run_job, write_records


def test_bad_lines_are_skipped_and_reported(tmp_path: Path, stub) -> None:
    server = stub()
    good = lambda i: {"id": f"g{i}", "messages": [{"role": "user", "content": f"good {i}"}]}  # noqa: E731
    lines = [
        good(0),  # line 1
        '{"id": "broken", "messages": [',  # 2 malformed JSON
        {"id": "role", "messages": [{"role": "wizard", "content": "hi"}]},  # 3 unknown role
        good(1),  # 4
        {"id": "empty", "messages": [{"role": "user", "content": "   "}]},  # 5 empty content
        {
            "id": "afirst",
            "messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}],
        },  # 6
        {"id": "huge", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]},  # 7 a 5 MB line
        b'{"id": "latin1", "messages": [{"role": "user", "content": "caf\xe9"}]}',  # 8 non-UTF-8 byte
        good(2),  # 9
    ]
    inp = write_records(tmp_path / "in.jsonl", lines)
    out = tmp_path / "regen.jsonl"
    summary = run_job(inp, out, server.base_url, max_prompt_chars=16 * 4096)

    assert summary["input"] == 9
    assert summary["ok"] == 3 and summary["skipped"] == 6 and summary["invariant_holds"]
    records = read_jsonl(out)
    assert [r["line"] for r in records] == list(range(1, 10)), "one output line per input record, in order"
    assert [r["status"] for r in records] == ["ok", *["skipped"] * 2, "ok", *["skipped"] * 4, "ok"]
    errors = {e["line"]: e["reason"] for e in read_jsonl(tmp_path / "regen.errors.jsonl")}
    assert sorted(errors) == [2, 3, 5, 6, 7, 8]
    assert "malformed JSON" in errors[2]
    assert "wizard" in errors[3]
    assert "empty content" in errors[5]
    assert "assistant" in errors[6] and "user turn" in errors[6]
    assert "5,242,880 characters" in errors[7]
    assert "UTF-8" in errors[8]
    assert records[1]["id"] == "line-2"
    assert server.state.outcomes.total() == 3, "only good records are sent"
    summary_file = json.loads((tmp_path / "regen.summary.json").read_text())
    assert summary_file["skipped"] == 6
