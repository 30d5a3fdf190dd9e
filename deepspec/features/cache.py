"""Offline feature cache: target hidden states written once, read by any of the three draft trainers.

Layout under a local directory or an ``s3://`` prefix::

    manifest.json          identity (target model + revision + config fingerprint, tokenizer hash,
                           chat-template hash, layer ids, storage dtype), the shard plan, one entry per
                           finished shard (sequences, tokens, bytes, sha256), ``complete`` and the
                           final ``content_hash``
    index.json             one entry per sequence: id, shard, row, token offset, length
    shards/shard_NNNNN.safetensors
        input_ids [N] int32, loss_mask [N] uint8, offsets [n+1] int64 (token offsets of the n sequences),
        features [N, k*H] (outputs of ``layer_ids`` concatenated), last_hidden [N, H] (after the final norm),
        and for fp8 storage features_scale [N, k] / last_hidden_scale [N, 1] float32 (per row and layer).

Writing is resumable: sequences are assigned to shards by a deterministic plan and each shard is
computed from scratch, written to a staging file and moved into place before the manifest records
it. After a crash, recorded shards whose checksum still matches are kept, anything else is
rewritten, so the final ``content_hash`` equals the one of an uninterrupted run. The reader checks
the manifest against the current target / tokenizer / template / layer ids and verifies each
shard's sha256 the first time it is opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepspec.data.sequences import TokenizedSequence
from deepspec.storage import LocalStore, S3Store, open_store

log = logging.getLogger(__name__)

FORMAT = "deepspec-feature-cache"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float8_e4m3fn": torch.float8_e4m3fn}

# Test hook: called as _CRASH_HOOK(shard_index, batch_index) after each computed batch (crash injection).
_CRASH_HOOK: Callable[[int, int], None] | None = None


class CacheError(RuntimeError):
    """The feature cache cannot be used as asked; the message says why and what to do."""


class CacheMismatchError(CacheError):
    """The cache was built for another target, tokenizer, template or layer set."""


class CacheCorruptError(CacheError):
    """A shard's checksum does not match the manifest."""


# --------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of the vocabulary and special tokens (changes whenever token ids would)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = getattr(tokenizer, "special_tokens_map", {})
    return _sha256_text(json.dumps({"vocab": vocab, "special": specials}, sort_keys=True, default=str))


def chat_template_hash(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return _sha256_text(
        json.dumps({"template": template, "kwargs": chat_template_kwargs or {}}, sort_keys=True)
    )


def sequences_hash(sequences: list[TokenizedSequence]) -> str:
    """Hash of the tokenized training data (ids + masks), so a resume never mixes two data sets."""
    h = hashlib.sha256()
    for s in sequences:
        h.update(s.id.encode())
        h.update(s.input_ids.to(torch.int32).numpy().tobytes())
        h.update(s.loss_mask.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def target_fingerprint(target: Any) -> dict[str, Any]:
    cfg = target.config
    return {
        "architectures": list(getattr(cfg, "architectures", None) or [type(target.model).__name__]),
        "num_layers": target.num_layers,
        "hidden_size": target.hidden_size,
        "vocab_size": target.vocab_size,
    }


@dataclass
class CacheIdentity:
    """What a cache must match to be used: written into the manifest, checked by the reader."""

    target_model: str
    target_revision: str | None
    target_config: dict[str, Any]
    tokenizer_hash: str
    chat_template_hash: str
    layer_ids: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": {
                "model": self.target_model,
                "revision": self.target_revision,
                "config": self.target_config,
            },
            "tokenizer_hash": self.tokenizer_hash,
            "chat_template_hash": self.chat_template_hash,
            "layer_ids": list(self.layer_ids),
        }


def bytes_per_token(hidden: int, num_layers: int, storage_dtype: str) -> int:
    """On-disk bytes per token: features + last hidden (+ fp8 scales) + input id (int32) + mask (uint8)."""
    elt = torch.empty(0, dtype=STORAGE_DTYPES[storage_dtype]).element_size()
    scales = 4 * (num_layers + 1) if storage_dtype == "float8_e4m3fn" else 0
    return (num_layers + 1) * hidden * elt + scales + 4 + 1


# --------------------------------------------------------------------------------------------------
# Quantisation
# --------------------------------------------------------------------------------------------------


def quantize_fp8(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, g*H] float -> (fp8 [N, g*H], scale [N, g] float32), one scale per row and group (layer)."""
    n = x.shape[0]
    xg = x.float().reshape(n, groups, -1)
    scale = (xg.abs().amax(dim=-1) / FP8_MAX).clamp_min(1e-12)  # [N, g]
    q = (xg / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(n, -1), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, g = scale.shape
    return (q.float().reshape(n, g, -1) * scale.unsqueeze(-1)).reshape(n, -1)


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


def plan_shards(lengths: list[int], shard_tokens: int) -> list[list[int]]:
    """Greedy, order-preserving assignment of sequences to shards of at most ``shard_tokens`` tokens."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if shards[-1] and used + n > shard_tokens:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return [s for s in shards if s]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _shard_name(i: int) -> str:
    return f"shards/shard_{i:05d}.safetensors"


def content_hash(shards: list[dict[str, Any]], index: list[dict[str, Any]]) -> str:
    """Hash of all shard checksums plus the index: equal for equal caches."""
    body = json.dumps({"shards": [s["sha256"] for s in shards], "index": index}, sort_keys=True)
    return _sha256_text(body)


class FeatureCacheWriter:
    """Computes target features for ``sequences`` and writes them as a resumable sharded cache."""

    def __init__(
        self,
        uri: str,
        target: Any,
        sequences: list[TokenizedSequence],
        identity: CacheIdentity,
        storage_dtype: str = "bfloat16",
        shard_tokens: int = 1 << 16,
        batch_tokens: int = 8192,
        endpoint_url: str | None = None,
    ):
        if storage_dtype not in STORAGE_DTYPES:
            raise CacheError(f"features.storage_dtype {storage_dtype!r} not one of {sorted(STORAGE_DTYPES)}")
        if list(identity.layer_ids) != list(target.layer_ids):
            raise CacheError(
                f"identity layer ids {identity.layer_ids} differ from the target's {target.layer_ids}"
            )
        self.store: LocalStore | S3Store = open_store(uri, endpoint_url)
        self.target, self.sequences, self.identity = target, sequences, identity
        self.storage_dtype, self.shard_tokens, self.batch_tokens = storage_dtype, shard_tokens, batch_tokens
        self.lengths = [int(s.input_ids.numel()) for s in sequences]
        self.plan = plan_shards(self.lengths, shard_tokens)
        self.data_hash = sequences_hash(sequences)

    # ---- planning -------------------------------------------------------------------------------

    def estimate_bytes(self) -> int:
        per_token = bytes_per_token(self.identity_hidden, len(self.identity.layer_ids), self.storage_dtype)
        overhead = 4096 * (len(self.plan) + 1) + 128 * len(self.sequences)  # headers, manifest, index
        return per_token * sum(self.lengths) + overhead

    @property
    def identity_hidden(self) -> int:
        return int(self.target.hidden_size)

    def _fresh_manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            **self.identity.as_dict(),
            "storage_dtype": self.storage_dtype,
            "hidden_size": self.identity_hidden,
            "shard_tokens": self.shard_tokens,
            "data_hash": self.data_hash,
            "num_sequences": len(self.sequences),
            "num_tokens": sum(self.lengths),
            "num_shards": len(self.plan),
            "bytes_per_token": bytes_per_token(
                self.identity_hidden, len(self.identity.layer_ids), self.storage_dtype
            ),
            "shards": [],
            "complete": False,
            "content_hash": None,
        }

    def _load_or_start(self) -> dict[str, Any]:
        fresh = self._fresh_manifest()
        if not self.store.exists(MANIFEST):
            return fresh
        old = json.loads(self.store.read_text(MANIFEST))
        keys = ("format", "target", "tokenizer_hash", "chat_template_hash", "layer_ids", "storage_dtype",
                "shard_tokens", "data_hash", "num_shards")  # fmt: skip
        diff = [k for k in keys if old.get(k) != fresh.get(k)]
        if diff:
            raise CacheError(
                f"{self.store.uri} already holds a different feature cache (differs in: {', '.join(diff)}); "
                "write to another path or delete it"
            )
        # Keep only recorded shards whose file is present and intact; the rest is rewritten.
        kept = []
        for entry in old["shards"]:
            name = entry["name"]
            try:
                ok = self.store.exists(name) and _file_sha256(self.store.local_copy(name)) == entry["sha256"]
            except FileNotFoundError:
                ok = False
            if ok:
                kept.append(entry)
            else:
                log.warning("shard %s missing or corrupt; it will be rewritten", name)
        old["shards"] = kept
        return old

    # ---- computing ------------------------------------------------------------------------------

    def _batches(self, members: list[int]) -> list[list[int]]:
        """Length-sorted batches of at most ``batch_tokens`` padded tokens (deterministic)."""
        order = sorted(members, key=lambda i: (-self.lengths[i], i))
        batches: list[list[int]] = []
        for i in order:
            if batches and (len(batches[-1]) + 1) * self.lengths[batches[-1][0]] <= self.batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    @torch.no_grad()
    def _compute_shard(self, shard_index: int, members: list[int]) -> dict[str, torch.Tensor]:
        from deepspec.data.sequences import pad_batch

        device = self.target.device
        k = len(self.identity.layer_ids)
        feats: dict[int, torch.Tensor] = {}
        lasts: dict[int, torch.Tensor] = {}
        for b, batch in enumerate(self._batches(members)):
            padded = pad_batch([self.sequences[i] for i in batch])
            out = self.target.capture(
                padded["input_ids"].to(device), attention_mask=padded["attention_mask"].to(device)
            )
            for row, i in enumerate(batch):
                n = self.lengths[i]
                feats[i] = out.features[row, :n].float().cpu()
                lasts[i] = out.last_hidden[row, :n].float().cpu()
            if _CRASH_HOOK is not None:
                _CRASH_HOOK(shard_index, b)
        f = torch.cat([feats[i] for i in members])  # [N, k*H]
        h = torch.cat([lasts[i] for i in members])  # [N, H]
        tensors = {
            "input_ids": torch.cat([self.sequences[i].input_ids for i in members]).to(torch.int32),
            "loss_mask": torch.cat([self.sequences[i].loss_mask for i in members]).to(torch.uint8),
            "offsets": torch.tensor(
                [0, *torch.tensor([self.lengths[i] for i in members]).cumsum(0).tolist()]
            ),
        }
        if self.storage_dtype == "float8_e4m3fn":
            tensors["features"], tensors["features_scale"] = quantize_fp8(f, k)
            tensors["last_hidden"], tensors["last_hidden_scale"] = quantize_fp8(h, 1)
        else:
            dt = STORAGE_DTYPES[self.storage_dtype]
            tensors["features"], tensors["last_hidden"] = f.to(dt), h.to(dt)
        return {name: t.contiguous() for name, t in tensors.items()}

    def _check_space(self, manifest: dict[str, Any]) -> None:
        done = {e["name"] for e in manifest["shards"]}
        remaining = [m for i, m in enumerate(self.plan) if _shard_name(i) not in done]
        per_token = manifest["bytes_per_token"]
        needed = sum(self.lengths[i] for m in remaining for i in m) * per_token + 4096 * (len(remaining) + 1)
        free = self.store.free_bytes()
        if free is None:  # S3: only one shard at a time is staged locally
            biggest = max((sum(self.lengths[i] for i in m) for m in remaining), default=0)
            needed = biggest * per_token + 4096
            p = self.store.staging_dir()
            import shutil

            free = shutil.disk_usage(p).free
            where = f"local staging {p}"
        else:
            where = str(self.store.uri)
        if needed > free:
            raise CacheError(
                f"not enough space for the feature cache at {where}: needs about {needed / 2**30:.2f} GiB "
                f"({per_token:,} bytes/token), {free / 2**30:.2f} GiB free; free space, pick another "
                "features.cache_path, or use features.storage_dtype=float8_e4m3fn"
            )

    def run(self, progress: bool = True) -> dict[str, Any]:
        """Write (or finish) the cache; returns the final manifest."""
        from safetensors.torch import save_file

        manifest = self._load_or_start()
        if manifest.get("complete"):
            log.info("feature cache %s is already complete", self.store.uri)
            return manifest
        self._check_space(manifest)
        done = {e["name"] for e in manifest["shards"]}
        # Drop leftovers of an interrupted run (partial shards, staging files).
        for name in self.store.list("shards"):
            if name not in done:
                self.store.delete(name)
        staging = self.store.staging_dir()
        for p in staging.glob("*"):
            p.unlink()
        self.store.write_text(MANIFEST, json.dumps(manifest, indent=1))
        bar = None
        if progress:
            from tqdm import tqdm

            done_tokens = sum(e["num_tokens"] for e in manifest["shards"])
            bar = tqdm(total=sum(self.lengths), initial=done_tokens, unit="tok", unit_scale=True,
                       desc="features", dynamic_ncols=True)  # fmt: skip
        t0, written = time.perf_counter(), 0
        for i, members in enumerate(self.plan):
            name = _shard_name(i)
            if name in done:
                continue
            tensors = self._compute_shard(i, members)
            local = staging / Path(name).name
            # One metadata key only: safetensors does not order metadata keys, and the bytes must be
            # reproducible for the content hash.
            save_file(tensors, str(local), metadata={"format": FORMAT})
            entry = {
                "name": name,
                "index": i,
                "first_sequence": members[0],
                "num_sequences": len(members),
                "num_tokens": int(tensors["input_ids"].numel()),
                "bytes": local.stat().st_size,
                "sha256": _file_sha256(local),
            }
            self.store.put_file(name, local)
            manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["index"])
            self.store.write_text(MANIFEST, json.dumps(manifest, indent=1))
            written += entry["num_tokens"]
            if bar is not None:
                bar.update(entry["num_tokens"])
                bar.set_postfix(tok_s=f"{written / max(time.perf_counter() - t0, 1e-9):,.0f}")
        if bar is not None:
            bar.close()
        index = []
        for e in manifest["shards"]:
            members = self.plan[e["index"]]
            offset = 0
            for row, i in enumerate(members):
                index.append({"id": self.sequences[i].id, "shard": e["index"], "row": row,
                              "offset": offset, "length": self.lengths[i]})  # fmt: skip
                offset += self.lengths[i]
        self.store.write_text(INDEX, json.dumps({"sequences": index}))
        manifest["complete"] = True
        manifest["content_hash"] = content_hash(manifest["shards"], index)
        manifest["total_bytes"] = sum(e["bytes"] for e in manifest["shards"])
        self.store.write_text(MANIFEST, json.dumps(manifest, indent=1))
        return manifest


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


class FeatureCache:
    """Read access to a complete cache, validated against the current target / tokenizer / layers."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.store = open_store(uri, endpoint_url)
        if not self.store.exists(MANIFEST):
            raise CacheError(f"no feature cache at {uri} (missing {MANIFEST}); run `deepspec features` first")
        self.manifest: dict[str, Any] = json.loads(self.store.read_text(MANIFEST))
        if self.manifest.get("format") != FORMAT:
            raise CacheError(f"{uri}/{MANIFEST} is not a deepspec feature cache")
        if not self.manifest.get("complete"):
            raise CacheError(
                f"feature cache {uri} is incomplete ({len(self.manifest['shards'])}/{self.manifest['num_shards']} "
                "shards); re-run `deepspec features` with the same recipe to finish it"
            )
        self.index: list[dict[str, Any]] = json.loads(self.store.read_text(INDEX))["sequences"]
        self.layer_ids: list[int] = list(self.manifest["layer_ids"])
        self.hidden_size = int(self.manifest["hidden_size"])
        self.fp8 = self.manifest["storage_dtype"] == "float8_e4m3fn"
        self._shards = {e["index"]: e for e in self.manifest["shards"]}
        self._open: dict[int, Any] = {}
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> list[int]:
        return [e["length"] for e in self.index]

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    def validate(self, identity: CacheIdentity, needed_layer_ids: list[int] | None = None) -> None:
        """Refuse a cache built for another target, revision, tokenizer, template or layer set."""
        m = self.manifest
        problems = []
        if m["target"]["model"] != identity.target_model:
            problems.append(f"target model: cache {m['target']['model']!r}, now {identity.target_model!r}")
        if m["target"]["revision"] != identity.target_revision:
            problems.append(
                f"target revision: cache {m['target']['revision']!r}, now {identity.target_revision!r}"
            )
        if m["target"]["config"] != identity.target_config:
            problems.append(f"target config: cache {m['target']['config']}, now {identity.target_config}")
        if m["tokenizer_hash"] != identity.tokenizer_hash:
            problems.append("tokenizer: the vocabulary or special tokens differ (tokenizer hash mismatch)")
        if m["chat_template_hash"] != identity.chat_template_hash:
            problems.append("chat template: the template or its kwargs (e.g. thinking) differ")
        needed = identity.layer_ids if needed_layer_ids is None else needed_layer_ids
        missing = [i for i in needed if i not in self.layer_ids]
        if missing:
            problems.append(f"layer ids: need {list(needed)}, cache has {self.layer_ids} (missing {missing})")
        if problems:
            raise CacheMismatchError(
                f"feature cache {self.store.uri} does not match this run:\n  - "
                + "\n  - ".join(problems)
                + "\nrebuild it with `deepspec features` for this recipe, or use features.mode=online"
            )

    def _shard(self, index: int) -> Any:
        from safetensors import safe_open

        if index not in self._open:
            entry = self._shards[index]
            local = self.store.local_copy(entry["name"])
            if index not in self._verified:
                got = _file_sha256(local)
                if got != entry["sha256"]:
                    raise CacheCorruptError(
                        f"feature cache shard {entry['name']} is corrupted: sha256 {got[:16]}... != manifest "
                        f"{entry['sha256'][:16]}...; re-run `deepspec features` to rewrite it"
                    )
                self._verified.add(index)
            self._open[index] = safe_open(str(local), framework="pt")
        return self._open[index]

    def verify(self) -> None:
        """Check every shard's checksum (raises :class:`CacheCorruptError`)."""
        for index in self._shards:
            self._shard(index)

    def sequence(self, i: int) -> TokenizedSequence:
        e = self.index[i]
        f = self._shard(e["shard"])
        sl = slice(e["offset"], e["offset"] + e["length"])
        ids = f.get_slice("input_ids")[sl].long()
        mask = f.get_slice("loss_mask")[sl].long()
        return TokenizedSequence(e["id"], ids, mask)

    def features(self, i: int, layer_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [T, k'*H] for ``layer_ids`` (default: all cached), last_hidden [T, H]) as float32."""
        e = self.index[i]
        f = self._shard(e["shard"])
        sl = slice(e["offset"], e["offset"] + e["length"])
        feats = f.get_slice("features")[sl]
        last = f.get_slice("last_hidden")[sl]
        if self.fp8:
            feats = dequantize_fp8(feats, f.get_slice("features_scale")[sl])
            last = dequantize_fp8(last, f.get_slice("last_hidden_scale")[sl])
        feats, last = feats.float(), last.float()
        if layer_ids is not None and list(layer_ids) != self.layer_ids:
            h = self.hidden_size
            cols = [
                feats[:, self.layer_ids.index(j) * h : (self.layer_ids.index(j) + 1) * h] for j in layer_ids
            ]
            feats = torch.cat(cols, dim=-1)
        return feats, last


def estimate_summary(num_tokens: int, hidden: int, num_layers: int, storage_dtype: str) -> str:
    per = bytes_per_token(hidden, num_layers, storage_dtype)
    return f"{num_tokens:,} tokens x {per:,} B/token = {per * num_tokens / 2**30:.2f} GiB ({storage_dtype})"


__all__ = [
    "CacheCorruptError",
    "CacheError",
    "CacheIdentity",
    "CacheMismatchError",
    "FeatureCache",
    "FeatureCacheWriter",
    "bytes_per_token",
    "chat_template_hash",
    "content_hash",
    "dequantize_fp8",
    "estimate_summary",
    "quantize_fp8",
    "target_fingerprint",
    "tokenizer_hash",
]


def cache_identity(recipe: Any, target: Any, tokenizer: Any) -> Any:
    """The identity a cache must match for this recipe and target (layer ids = the target's)."""
    from deepspec.data.template import template_kwargs

    return CacheIdentity(
        target_model=recipe.target.model,
        target_revision=recipe.target.revision,
        target_config=target_fingerprint(target),
        tokenizer_hash=tokenizer_hash(tokenizer),
        chat_template_hash=chat_template_hash(tokenizer, template_kwargs(recipe.regeneration)),
        layer_ids=list(target.layer_ids),
    )
