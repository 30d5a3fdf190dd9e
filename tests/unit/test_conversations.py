"""Conversation readers: every supported format normalises to OpenAI messages; bad lines are reported."""

from __future__ import annotations

import json
from pathlib import Path

from deepspec.data import BadRecord, Conversation, read_conversations


def _write_lines(tmp_path: Path, lines: list[bytes]) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_formats_normalise(tmp_path: Path) -> None:
    p = _write_lines(
        tmp_path,
        [
            _j(
                {
                    "id": "a",
                    "conversations": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"},
                    ],
                }
            ),
            _j(
                {
                    "id": "b",
                    "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                }
            ),
            _j(
                {"id": "c", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
            ),
            _j({"turns": ["t1", "t2"]}),
        ],
    )
    recs = list(read_conversations(p))
    assert all(isinstance(r, Conversation) for r in recs)
    a, b, c, d = recs
    assert a.messages[1] == {"role": "assistant", "content": "yo"}
    assert [m["role"] for m in b.messages] == ["system", "user"]
    assert c.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert d.id == "line-4" and [m["content"] for m in d.messages] == ["t1", "t2"]
    assert b.prompt_turns() == b.messages and a.prompt_turns() == a.messages[:1]


def test_tool_call_fields_preserved(tmp_path: Path) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "42"},
    ]
    (rec,) = read_conversations(_write_lines(tmp_path, [_j({"id": "t", "messages": msgs})]))
    assert isinstance(rec, Conversation)
    assert rec.messages[1]["tool_calls"] == [call]
    assert rec.messages[2]["tool_call_id"] == "c1" and rec.messages[2]["name"] == "f"


def test_bad_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    good = _j({"id": "g", "conversations": [{"role": "user", "content": "ok"}]})
    lines = [
        good,
        b'{"id": "x", "conversations": [',  # 2 malformed JSON
        _j({"id": "r", "conversations": [{"role": "wizard", "content": "x"}]}),  # 3 unknown role
        _j({"id": "e", "conversations": [{"role": "user", "content": "   "}]}),  # 4 empty content
        _j(
            {
                "id": "f",
                "conversations": [
                    {"role": "assistant", "content": "first"},
                    {"role": "user", "content": "u"},
                ],
            }
        ),
        b'{"id": "big", "turns": ["' + b"x" * (9 * 1024 * 1024) + b'"]}',  # 6 huge line
        b'{"id": "bin", "turns": ["caf\xe9"]}',  # 7 non-UTF-8
        b"[1, 2]",  # 8 not an object
        _j({"id": "g", "turns": ["dup"]}),  # 9 duplicate id
        b"",
        _j({"id": "last", "turns": ["fine"]}),  # 11
    ]
    recs = list(read_conversations(_write_lines(tmp_path, lines)))
    bad = {r.line: r.reason for r in recs if isinstance(r, BadRecord)}
    assert sorted(bad) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "malformed JSON" in bad[2]
    assert "'wizard'" in bad[3]
    assert "empty content" in bad[4]
    assert "first non-system turn is 'assistant'" in bad[5]
    assert "bytes" in bad[6]
    assert "UTF-8" in bad[7]
    assert "object" in bad[8]
    assert "duplicate id" in bad[9]
    assert [r.id for r in recs if isinstance(r, Conversation)] == ["g", "last"]


def test_shared_prompts_parse(shared_dir: Path) -> None:
    recs = []
    for r in read_conversations(shared_dir / "datasets/train/prompts.jsonl"):
        recs.append(r)
        if len(recs) == 500:
            break
    assert all(isinstance(r, Conversation) for r in recs)
    assert all(r.messages[0]["role"] == "user" for r in recs)
