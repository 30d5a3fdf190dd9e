"""bench/train_throughput.py's packing parts on a tiny random target (CPU): the variant syntax, the
``--check-packing`` comparison of a packed micro-batch with the same sequences padded (it passes, and it
fails when a draft's packed mask lets a sequence see its neighbour), the length profile and the profile
table."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import train_lengths  # noqa: E402
import train_packing_check  # noqa: E402
import train_profile  # noqa: E402
import train_throughput  # noqa: E402

ARGS = types.SimpleNamespace(tiny=True, draft_layers=1, num_anchors=8, parallelism="ddp")
# lengths 12..60 with an answer after a 4-token prompt: rows of 60 tokens hold two or three sequences
PROFILE = [(n, [(4, n)]) for n in (60, 12, 41, 17, 55, 23, 30, 14, 48, 20, 36, 26)]


def _packed_trainer(algorithm: str, profile=PROFILE):
    from deepspec.testing.shapes import random_target

    device = torch.device("cpu")
    target = random_target("tiny", device, algorithm)
    sequences = train_lengths.sequences_from_profile(profile, 24, target.vocab_size)
    variant = train_throughput.Variant.parse("check=12:-:240:off:packing")
    return train_throughput.build_trainer(ARGS, target, algorithm, variant, sequences, device)


def test_variant_strings_old_and_packed():
    old = train_throughput.Variant.parse("tokens=256:-:32768:off")
    assert (old.global_batch, old.micro_tokens, old.compile, old.packing) == (256, 32768, "off", False)
    assert train_throughput.Variant.parse("p=64:-:32768:off:packing").packing
    assert train_throughput.Variant.parse("p=64:4:-:on:pack").packing
    for bad in ("p=64:-:32768:off:padded", "p=64:-:32768", "p=64:-:32768:off:packing:x"):
        with pytest.raises(SystemExit):
            train_throughput.Variant.parse(bad)


def _leaky_block_mask(build):
    def leaky(anchors, seq_len, block_size, starts=None):
        return build(anchors, seq_len, block_size)  # context from row position 0: sees the neighbour

    return leaky


def _leaky_causal_mask(position_ids):
    t = position_ids.shape[1]
    return torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(position_ids.shape[0], 1, t, t)


@pytest.mark.parametrize("algorithm", ["eagle3", "dflash"])
def test_packing_check_passes_and_catches_a_leaky_mask(monkeypatch, algorithm):
    check = train_packing_check.check_packing(_packed_trainer(algorithm))
    assert check["passed"], check["problems"]
    assert check["shared_rows"] >= 2 and check["sequences"] > check["packed_rows"][0]
    assert check["hidden_rel"] < 1e-5 and check["control_hidden_rel"] > 0.1  # measured 1e-7 and 0.3-0.8
    assert "CHECK PASSED" in train_packing_check.describe(check)

    # a packed mask that ignores sequence boundaries (the bug the GPU check looks for) must fail it
    import deepspec.models.dflash as dflash
    import deepspec.models.eagle3 as eagle3

    if algorithm == "eagle3":
        monkeypatch.setattr(eagle3, "packed_causal_mask", _leaky_causal_mask)
    else:
        monkeypatch.setattr(dflash, "build_block_mask", _leaky_block_mask(dflash.build_block_mask))
    broken = train_packing_check.check_packing(_packed_trainer(algorithm))
    assert not broken["passed"]
    assert any("hidden states packed vs padded" in p for p in broken["problems"])
    assert "CHECK FAILED" in train_packing_check.describe(broken)


def test_packing_check_packs_alike_lengths_into_longer_rows():
    """Lengths too alike to share a row of the longest one: the check still compares shared rows."""
    check = train_packing_check.check_packing(
        _packed_trainer("dspark", [(n, [(4, n)]) for n in range(40, 52)])
    )
    assert check["passed"], check["problems"]
    assert check["packed_rows"][1] == 2 * check["trainer_row_length"] and check["shared_rows"] >= 2


def test_length_profile_round_trip(tmp_path):
    import gzip
    import json

    assert train_lengths.mask_spans([0, 1, 1, 0, 1]) == [(1, 3), (4, 5)]
    path = tmp_path / "lengths.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"sequences": [[n, [list(s) for s in spans]] for n, spans in PROFILE]}, f)
    profile = train_lengths.load_length_profile(str(path))
    assert profile == PROFILE
    seqs = train_lengths.sequences_from_profile(profile, 30, 100)
    assert sorted(s.input_ids.numel() for s in seqs[:12]) == sorted(n for n, _ in PROFILE)  # each once first
    assert all(int(s.loss_mask[:4].sum()) == 0 and bool(s.loss_mask[4:].all()) for s in seqs)


def test_profile_table_and_counts(tmp_path):
    trainer = _packed_trainer("dflash")
    out = tmp_path / "profile.txt"
    summary = train_profile.profile_steps(trainer, 1, str(out), "tiny dflash")
    text = out.read_text()
    assert "Self CPU" in text and "# per step: kernel_launches" in text
    assert summary["per_step"]["aten::to"] > 0 and summary["device_busy_fraction"] is None
