"""``deepspec benchmarks fetch --out DIR``: build the ``{"turns": [...]}`` benchmark files from public data.

Raw files are downloaded over HTTPS (Hugging Face ``resolve`` URLs and GitHub raw files; no
``datasets`` dependency), then each record is converted to the prompt the reference protocol uses.
The conversions are pure functions (:data:`CONVERTERS`), tested offline on small fixtures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = "build the benchmark prompt files ({turns: [...]} JSONL) from the public datasets (needs network)"

REASONING_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HF = "https://huggingface.co/datasets/{repo}/resolve/main/{path}"


# ------------------------------------------------------------------------------------ conversions


def _text(rec: dict[str, Any], *keys: str) -> str:
    for k in keys:
        v = rec.get(k)
        if isinstance(v, str) and v.strip():
            return v
    raise ValueError(f"record has none of the fields {keys} (keys: {sorted(rec)[:10]})")


def conv_math(rec: dict[str, Any]) -> list[str]:
    """GSM8K / MATH-500 / AIME: the problem plus the reasoning suffix."""
    return [_text(rec, "question", "problem", "Problem") + REASONING_SUFFIX]


def conv_humaneval(rec: dict[str, Any]) -> list[str]:
    return [
        "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
        + _text(rec, "prompt")
        + "\n```"
    ]


def conv_mbpp(rec: dict[str, Any]) -> list[str]:
    return [_text(rec, "prompt", "text")]


def conv_livecodebench(rec: dict[str, Any]) -> list[str]:
    starter = rec.get("starter_code") or ""
    head = (
        "You are an expert Python programmer. You will be given a question (problem specification) and will "
        "generate a correct Python program that matches the specification and passes all tests. You will NOT "
        "return anything except for the program\n\n### Question:\n"
    )
    body = _text(rec, "question_content")
    if starter.strip():
        fmt = (
            "\n\n### Format: You will use the following starter code to write the solution to the problem and "
            f"enclose your code within delimiters.\n```python\n{starter}\n```\n\n### Answer: (use the provided "
            "format with backticks)"
        )
    else:
        fmt = (
            "\n\n### Format: Write your code in the following format:\n```python\n# YOUR CODE HERE\n```\n\n"
            "### Answer: (use the provided format with backticks)"
        )
    return [head + body + fmt]


def conv_mt_bench(rec: dict[str, Any]) -> list[str]:
    turns = rec.get("turns") or rec.get("prompt")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns) or not turns:
        raise ValueError("mt-bench record needs a non-empty 'turns' (or 'prompt') list of strings")
    return list(turns)


def conv_instruction(rec: dict[str, Any]) -> list[str]:
    """Self-instruct user-oriented / Alpaca: instruction, plus 'Input:' when the instance has one."""
    instruction = _text(rec, "instruction")
    inp = rec.get("input")
    if inp is None and isinstance(rec.get("instances"), list) and rec["instances"]:
        inp = rec["instances"][0].get("input")
    return [f"{instruction}\n\nInput:\n{inp}" if isinstance(inp, str) and inp.strip() else instruction]


def conv_arena_hard(rec: dict[str, Any]) -> list[str]:
    if isinstance(rec.get("turns"), list) and rec["turns"]:
        first = rec["turns"][0]
        return [first["content"] if isinstance(first, dict) else str(first)]
    return [_text(rec, "prompt", "question")]


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]  # all are read and concatenated (e.g. LiveCodeBench's test1..6 files)
    convert: Callable[[dict[str, Any]], list[str]]
    note: str = ""


SOURCES: dict[str, Source] = {
    "gsm8k": Source(
        (
            "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
        ),
        conv_math,
    ),
    "math500": Source((HF.format(repo="HuggingFaceH4/MATH-500", path="test.jsonl"),), conv_math),
    "aime25": Source((HF.format(repo="math-ai/aime25", path="test.jsonl"),), conv_math),
    "humaneval": Source(
        ("https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz",),
        conv_humaneval,
    ),
    "mbpp": Source(
        (
            "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/sanitized-mbpp.json",
        ),
        conv_mbpp,
        "sanitized split, all records (the reference uses its test portion)",
    ),
    "livecodebench": Source(
        tuple(
            HF.format(repo="livecodebench/code_generation_lite", path=f"test{'' if i == 1 else i}.jsonl")
            for i in range(1, 7)
        ),
        conv_livecodebench,
    ),
    "mt-bench": Source(
        (HF.format(repo="HuggingFaceH4/mt_bench_prompts", path="raw/question.jsonl"),), conv_mt_bench
    ),
    "user-oriented": Source(
        (
            "https://raw.githubusercontent.com/yizhongw/self-instruct/main/human_eval/user_oriented_instructions.jsonl",
        ),
        conv_instruction,
        "stands in for Alpaca",
    ),
    "alpaca": Source((HF.format(repo="tatsu-lab/alpaca_eval", path="alpaca_eval.json"),), conv_instruction),
    "arena-hard-v2": Source(
        (
            "https://raw.githubusercontent.com/lmarena/arena-hard-auto/main/data/arena-hard-v2.0/question.jsonl",
        ),
        conv_arena_hard,
    ),
}
CONVERTERS = {name: src.convert for name, src in SOURCES.items()}


# ------------------------------------------------------------------------------------ raw readers


def iter_records(name: str, data: bytes) -> Iterator[dict[str, Any]]:
    """Records of a raw file by its extension: .jsonl / .json (a list) / .parquet (needs pyarrow); .gz ok."""
    if name.endswith(".gz"):
        import gzip

        data, name = gzip.decompress(data), name.removesuffix(".gz")
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError("reading .parquet needs pyarrow: pip install pyarrow") from e
        yield from pq.read_table(io.BytesIO(data)).to_pylist()
    elif name.endswith(".json"):
        obj = json.loads(data)
        yield from (obj if isinstance(obj, list) else obj.get("data", []))
    else:
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                yield json.loads(line)


def convert_records(
    benchmark: str, records: Iterable[dict[str, Any]]
) -> tuple[list[dict[str, list[str]]], list[str]]:
    """Converted ``{"turns": [...]}`` rows and one error message per record that failed."""
    convert = CONVERTERS[benchmark]
    rows, errors = [], []
    for i, rec in enumerate(records):
        try:
            rows.append({"turns": convert(rec)})
        except (ValueError, KeyError, TypeError) as e:
            errors.append(f"{benchmark} record {i}: {e}")
    return rows, errors


def _download(url: str, timeout: float) -> bytes:
    import httpx

    headers = {}
    token = os.environ.get("HF_TOKEN")
    if token and "huggingface.co" in url:
        headers["Authorization"] = f"Bearer {token}"
    r = httpx.get(url, follow_redirects=True, timeout=timeout, headers=headers)
    r.raise_for_status()
    return r.content


def fetch(benchmarks: list[str], out: Path, timeout: float = 120.0, force: bool = False) -> dict[str, int]:
    from deepspec.storage import atomic_write_jsonl

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        print("note: HF_HUB_OFFLINE=1 is set; downloads will still be attempted over HTTPS")
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name in benchmarks:
        path = out / f"{name}.jsonl"
        if path.exists() and not force:
            print(f"{name}: {path} exists (use --force to rebuild)")
            continue
        src = SOURCES[name]
        records: list[dict[str, Any]] = []
        for url in src.urls:
            records.extend(iter_records(url, _download(url, timeout)))
        rows, errors = convert_records(name, records)
        for e in errors[:5]:
            print(f"warning: {e}")
        atomic_write_jsonl(path, rows)
        counts[name] = len(rows)
        print(f"{name}: {len(rows)} prompts -> {path}" + (f" ({len(errors)} skipped)" if errors else ""))
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = sub.add_parser("fetch", help="download and convert the benchmark prompt sets")
    f.add_argument("--out", required=True, help="output directory (one <benchmark>.jsonl per benchmark)")
    f.add_argument(
        "--benchmarks",
        default=",".join(k for k in SOURCES if k != "alpaca"),
        help=f"comma-separated subset of: {', '.join(SOURCES)}",
    )
    f.add_argument("--timeout", type=float, default=120.0)
    f.add_argument("--force", action="store_true", help="rebuild files that exist")


def run(args: argparse.Namespace) -> int:
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; known: {', '.join(SOURCES)}")
        return 2
    try:
        fetch(names, Path(args.out), args.timeout, args.force)
    except Exception as e:  # network / HTTP errors: one clear line
        print(f"error: fetching failed: {e} (needs network access to huggingface.co and github)")
        return 1
    return 0
