"""Real sequence lengths and assistant spans for the training benchmark (``train_throughput.py --real-lengths``).

Packing's gain depends on the spread of lengths, so the benchmark can replay the lengths and
supervised spans of a real regenerated data set with random token ids (throughput does not depend on
the tokens). A length profile is a small gzipped JSON: ``{"source", "max_length", "sequences": [[length,
[[start, end], ...]], ...]}``, spans being the supervised (assistant) token ranges.

    # write a profile from a regenerated JSONL (tokenised like training: chat template, data.max_length)
    python bench/train_lengths.py .real/run/runs/smollm2/regenerated.jsonl bench/train_lengths_smollm2.json.gz

``bench/train_lengths_smollm2.json.gz``: the 16,123 SmolLM2-135M-Instruct answers regenerated for the
shared prompts (issue 13 second pass), SmolLM2 tokenizer, max_length 1024 as configs/*/smollm2.yaml.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Spans = list[tuple[int, int]]


def mask_spans(mask: list[int]) -> Spans:
    """Runs of 1 in a 0/1 list as ``(start, end)`` half-open ranges."""
    spans: Spans = []
    start = None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


def profile_from_regenerated(
    path: str, tokenizer_dir: str | None, max_length: int
) -> list[tuple[int, Spans]]:
    """Tokenise a regenerated JSONL as training does; ``tokenizer_dir`` None: SmolLM2's tokenizer."""
    from deepspec.data.sequences import load_training_records, tokenize_records

    if tokenizer_dir is None:
        from deepspec.target_model.files import smollm2_tokenizer

        tokenizer = smollm2_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    seqs = tokenize_records(load_training_records(path), tokenizer, max_length)
    return [(int(s.input_ids.numel()), mask_spans(s.loss_mask.tolist())) for s in seqs]


def load_length_profile(path: str, tokenizer_dir: str | None = None, max_length: int = 1024):
    """``(length, supervised spans)`` of every sequence of a profile file or of a regenerated JSONL."""
    if path.endswith(".jsonl"):
        return profile_from_regenerated(path, tokenizer_dir, max_length)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return [(int(n), [(int(a), int(b)) for a, b in spans]) for n, spans in data["sequences"]]


def sequences_from_profile(profile: list[tuple[int, Spans]], n: int, vocab: int, seed: int = 0) -> list:
    """``n`` sequences with the lengths and supervised spans of a seeded random draw (without replacement
    while the profile lasts) from ``profile``, and random token ids."""
    from deepspec.data.sequences import TokenizedSequence

    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n:
        order += torch.randperm(len(profile), generator=g).tolist()
    out = []
    for k, i in enumerate(order[:n]):
        length, spans = profile[i]
        mask = torch.zeros(length, dtype=torch.long)
        for a, b in spans:
            mask[a:b] = 1
        out.append(TokenizedSequence(f"r{k}", torch.randint(10, vocab, (length,), generator=g), mask))
    return out


def summary(profile: list[tuple[int, Spans]]) -> dict[str, float]:
    """Mean / p95 / max of sequence and supervised lengths."""
    lengths = torch.tensor([n for n, _ in profile], dtype=torch.float64)
    supervised = torch.tensor([sum(b - a for a, b in s) for _, s in profile], dtype=torch.float64)
    return {
        "sequences": len(profile),
        "mean_length": float(lengths.mean()),
        "p95_length": float(lengths.quantile(0.95)),
        "max_length": float(lengths.max()),
        "mean_supervised": float(supervised.mean()),
        "p95_supervised": float(supervised.quantile(0.95)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("regenerated", help="regenerated JSONL")
    p.add_argument("out", help="profile to write (.json.gz)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: SmolLM2's)")
    p.add_argument("--max-length", type=int, default=1024, help="data.max_length of the recipe")
    args = p.parse_args()
    profile = profile_from_regenerated(args.regenerated, args.tokenizer, args.max_length)
    stats = summary(profile)
    data = {"source": Path(args.regenerated).name, "max_length": args.max_length, "summary": stats,
            "sequences": [[n, [list(s) for s in spans]] for n, spans in profile]}  # fmt: skip
    with gzip.open(args.out, "wt", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
