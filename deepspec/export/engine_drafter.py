"""A drafter that reads only an export folder and proposes tokens the way SGLang / vLLM would.

It is deliberately independent of :mod:`deepspec.models`: weights come from ``model.safetensors``, every
setting from ``config.json``, and the forward passes are written here from the engines' semantics (cited
in :mod:`deepspec.export.engines`), not from the training code. What it shares with the engines:

* the target's embedding and LM head (neither engine loads a draft embedding / LM head for these drafts);
* the layers the engine captures (:func:`~deepspec.export.engines.engine_capture_ids`: ascending, unique,
  vLLM's Eagle3 layer shift) - the caller feeds features of exactly those layers;
* the loader's behaviour on a misnamed tensor (refused, :class:`EngineLoadError`) and on a *missing*
  Markov tensor (loaded silently with a random head, as neither engine checks);
* the slot convention: DFlash reads mask slots 1.. of ``[anchor, mask x (block_size-1)]`` as the tokens at
  anchor+1.., DSpark reads every slot k as anchor+k+1 and adds the Markov bias ``W2 W1[prev]`` left to right;
  Eagle3 maps draft ids to target ids with ``d2t``.

It recomputes the draft's attention over the whole context at every proposal (batch 1, no cache): slow,
but simple enough to read against the engines' code. Meant for smoke tests and conformance tests.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deepspec.export.engines import (
    ACCEPTED,
    ConformanceError,
    ExportView,
    engine_capture_ids,
    expected_tensors,
    export_algorithm,
)
from deepspec.models.base import Proposal, sample_from_logits


class EngineLoadError(ConformanceError):
    """The engine's loader would refuse this export."""


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE. x: [heads, T, d]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = positions.float()[:, None] * inv[None]  # [T, d/2]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class EngineDrafter:
    """Batch-1 :class:`~deepspec.models.base.SpeculativeDrafter` over an export folder, for one engine."""

    def __init__(self, export_dir: str | Path, engine: str, target: Any, seed: int = 0):
        from safetensors.torch import load_file

        view = ExportView.read(export_dir)
        algorithm = export_algorithm(view, engine)
        if algorithm is None or view.architecture not in ACCEPTED[engine]:
            raise EngineLoadError(
                f"{engine} does not load architectures={view.cfg.get('architectures')} as one of our drafts"
                + (
                    " (vLLM routes it to its DeepSeek-V4 model)"
                    if view.architecture == "DSparkDraftModel"
                    else ""
                )
            )
        self.engine, self.algorithm, self.cfg = engine, algorithm, view.cfg
        self.capture_layer_ids = engine_capture_ids(view.cfg, engine)
        if min(self.capture_layer_ids) < 0:
            raise EngineLoadError(
                f"{engine} would feed the embedding output as a feature (ids {self.capture_layer_ids})"
            )
        raw = load_file(str(Path(export_dir) / "model.safetensors"))
        if engine == "sglang" and algorithm == "eagle3" and len(self.capture_layer_ids) != 3:
            raise EngineLoadError("SGLang's Eagle3 fc reads exactly 3 captured layers (hidden_size_in * 3)")
        fc_in, width = raw["fc.weight"].shape[1] if "fc.weight" in raw else 0, int(view.cfg["hidden_size"])
        if fc_in != len(self.capture_layer_ids) * width:
            raise EngineLoadError(
                f"{engine} feeds the outputs of layers {self.capture_layer_ids} ({len(self.capture_layer_ids)} x "
                f"{width}) but fc.weight reads {fc_in} features"
            )
        self.w = self._load(raw, seed)
        self.embed_weight = target.embed_tokens.weight.detach().float().cpu()
        self.lm_head_weight = target.lm_head.weight.detach().float().cpu()
        bias = getattr(target.lm_head, "bias", None)
        self.lm_head_bias = None if bias is None else bias.detach().float().cpu()
        c = view.cfg
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.theta = float(
            (c.get("rope_parameters") or {}).get("rope_theta") or c.get("rope_theta") or 10000.0
        )
        rope_type = (c.get("rope_parameters") or {}).get("rope_type", "default")
        if rope_type != "default":
            raise NotImplementedError(
                f"the engine drafter implements default RoPE only, export has {rope_type!r}"
            )
        self.heads, self.kv_heads = int(c["num_attention_heads"]), int(c["num_key_value_heads"])
        self.head_dim = int(c["head_dim"])
        self.reset()

    # ---- loading, as the engines' loaders do -----------------------------------------------------

    def _load(self, raw: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        want = expected_tensors(self.cfg, self.algorithm)
        unexpected = sorted(set(raw) - set(want))
        if unexpected:
            raise EngineLoadError(
                f"{self.engine} refuses unexpected weights {unexpected[:6]} (no such parameter)"
            )
        w = {k: v.float() if v.is_floating_point() else v for k, v in raw.items()}
        markov = {"markov_head.markov_w1.weight", "markov_head.markov_w2.weight"}
        g = torch.Generator().manual_seed(seed)
        for name in sorted(set(want) - set(raw)):
            if name not in markov:
                raise EngineLoadError(f"{self.engine} cannot load the export: missing weight {name}")
            w[name] = torch.randn(want[name][0], generator=g) * 0.02  # loaded silently with a random head
        return w

    # ---- the protocol ------------------------------------------------------------------------------

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.features: list[torch.Tensor] = []

    def extend(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        if tokens.numel() != features.shape[0]:
            raise ValueError(f"extend: {tokens.numel()} tokens but {features.shape[0]} feature rows")
        self.tokens += [int(t) for t in tokens.reshape(-1).tolist()]
        self.features += list(features.detach().float().cpu())

    def propose(
        self, anchor: int, num_proposals: int, temperature: float, generator: torch.Generator | None = None
    ) -> Proposal:
        if self.algorithm == "eagle3":
            return self._eagle3(int(anchor), int(num_proposals), temperature, generator)
        return self._block(int(anchor), int(num_proposals), temperature, generator)

    # ---- shared pieces -------------------------------------------------------------------------------

    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self.embed_weight[torch.tensor(ids, dtype=torch.long)]

    def _target_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.lm_head_weight, self.lm_head_bias)

    def _proj(self, prefix: str, x: torch.Tensor, heads: int) -> torch.Tensor:
        """x [T, in] -> [heads, T, d]."""
        y = x @ self.w[f"{prefix}.weight"].t()
        return y.view(x.shape[0], heads, self.head_dim).transpose(0, 1)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q [Hq, Tq, d], k/v [Hkv, Tk, d], mask [Tq, Tk] bool (True = may attend) -> [Tq, Hq*d]."""
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, -1) @ v
        return out.transpose(0, 1).reshape(q.shape[1], -1)

    def _mlp(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        gate = F.silu(x @ w[f"{prefix}.gate_proj.weight"].t())
        return (gate * (x @ w[f"{prefix}.up_proj.weight"].t())) @ w[f"{prefix}.down_proj.weight"].t()

    def _choose(self, logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
        tok, probs = sample_from_logits(logits[None], temperature, generator)
        return int(tok[0]), probs[0]

    # ---- Eagle3: fc(aux) + one Llama layer on concat(norm(embed), norm(hidden)), d2t -----------------

    def _eagle3_layer(
        self, emb: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor, past: list, causal: bool
    ):
        w, p = self.w, "midlayer"
        x = torch.cat([_rms(emb, w[f"{p}.input_layernorm.weight"], self.eps),
                       _rms(hidden, w[f"{p}.hidden_norm.weight"], self.eps)], -1)  # fmt: skip
        q = _rope(self._proj(f"{p}.self_attn.q_proj", x, self.heads), pos, self.theta)
        k = _rope(self._proj(f"{p}.self_attn.k_proj", x, self.kv_heads), pos, self.theta)
        v = self._proj(f"{p}.self_attn.v_proj", x, self.kv_heads)
        past.append((k, v))
        keys = torch.cat([kk for kk, _ in past], 1)
        vals = torch.cat([vv for _, vv in past], 1)
        mask = None
        if causal:
            t = q.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool).tril()
        h = hidden + self._attend(q, keys, vals, mask) @ w[f"{p}.self_attn.o_proj.weight"].t()
        return h + self._mlp(f"{p}.mlp", _rms(h, w[f"{p}.post_attention_layernorm.weight"], self.eps))

    def _eagle3(self, anchor: int, n: int, temperature: float, generator: torch.Generator | None) -> Proposal:
        if not self.features:
            raise RuntimeError("propose() before extend()")
        w = self.w
        hidden = torch.stack(self.features) @ w["fc.weight"].t()  # [T, H]
        pair_tokens = [*self.tokens[1:], anchor]  # pair j: feature of position j, token j+1
        t = hidden.shape[0]
        past: list = []
        out = self._eagle3_layer(self._embed(pair_tokens), hidden, torch.arange(t), past, causal=True)
        h = out[-1:]
        d2t, vocab = w["d2t"].long(), int(self.cfg["vocab_size"])
        tokens, probs = [], []
        for step in range(n):
            logits = _rms(h, w["norm.weight"], self.eps) @ w["lm_head.weight"].t()  # [1, Vd]
            idx, p = self._choose(logits[0], temperature, generator)
            token = idx + int(d2t[idx])
            full = torch.zeros(vocab)
            full[torch.arange(d2t.numel()) + d2t] = p
            tokens.append(token)
            probs.append(full)
            if step + 1 < n:  # the next step reads this step's output hidden and token at the next position
                h = self._eagle3_layer(self._embed([token]), h, torch.tensor([t + step]), past, causal=False)
        return Proposal(tokens=torch.tensor(tokens, dtype=torch.long), probs=torch.stack(probs))

    # ---- DFlash / DSpark: context K/V from hidden_norm(fc(features)), a non-causal block ------------

    def _block_hidden(self, anchor: int) -> torch.Tensor:
        """Final normed hidden [block_size, H] of ``[anchor, mask x (block_size-1)]`` after the context."""
        w, c = self.w, self.cfg
        block = int((c.get("dflash_config") or {}).get("block_size") or c["block_size"])
        mask_id = int(c["dflash_config"]["mask_token_id"])
        n = len(self.features)
        ctx = (
            _rms(torch.stack(self.features) @ w["fc.weight"].t(), w["hidden_norm.weight"], self.eps)
            if n
            else None
        )
        h = self._embed([anchor] + [mask_id] * (block - 1))
        pos_b, pos_c = torch.arange(n, n + block), torch.arange(n)
        for i in range(int(c["num_hidden_layers"])):
            p = f"layers.{i}"
            x = _rms(h, w[f"{p}.input_layernorm.weight"], self.eps)

            def kv(src: torch.Tensor, pos: torch.Tensor, p: str = p) -> tuple[torch.Tensor, torch.Tensor]:
                k = _rms(
                    self._proj(f"{p}.self_attn.k_proj", src, self.kv_heads),
                    w[f"{p}.self_attn.k_norm.weight"],
                    self.eps,
                )
                return _rope(k, pos, self.theta), self._proj(f"{p}.self_attn.v_proj", src, self.kv_heads)

            q = _rms(
                self._proj(f"{p}.self_attn.q_proj", x, self.heads),
                w[f"{p}.self_attn.q_norm.weight"],
                self.eps,
            )
            q = _rope(q, pos_b, self.theta)
            k, v = kv(x, pos_b)
            if ctx is not None:
                kc, vc = kv(ctx, pos_c)
                k, v = torch.cat([kc, k], 1), torch.cat([vc, v], 1)
            h = h + self._attend(q, k, v, None) @ w[f"{p}.self_attn.o_proj.weight"].t()
            h = h + self._mlp(f"{p}.mlp", _rms(h, w[f"{p}.post_attention_layernorm.weight"], self.eps))
        return _rms(h, w["norm.weight"], self.eps)

    def _block(self, anchor: int, n: int, temperature: float, generator: torch.Generator | None) -> Proposal:
        hidden = self._block_hidden(anchor)
        if self.algorithm == "dflash":
            hidden = hidden[1:]  # the engines drop slot 0's output; mask slot j is the token at anchor+j
        hidden = hidden[:n]
        base = self._target_logits(hidden)
        if self.algorithm == "dflash":
            tokens, probs = sample_from_logits(base, temperature, generator)
            return Proposal(tokens=tokens, probs=probs)
        w1, w2 = self.w["markov_head.markov_w1.weight"], self.w["markov_head.markov_w2.weight"]
        conf_w = self.w.get("confidence_head.proj.weight")
        prev, tokens, rows, confs = anchor, [], [], []
        for k in range(hidden.shape[0]):  # the sequential Markov walk, left to right
            e = w1[prev]
            tok, p = self._choose(base[k] + w2 @ e, temperature, generator)
            if conf_w is not None:
                feats = (
                    torch.cat([hidden[k], e]) if self.cfg.get("confidence_head_with_markov") else hidden[k]
                )
                confs.append(torch.sigmoid(conf_w[0] @ feats + self.w["confidence_head.proj.bias"][0]))
            tokens.append(tok)
            rows.append(p)
            prev = tok
        return Proposal(
            tokens=torch.tensor(tokens, dtype=torch.long),
            probs=torch.stack(rows),
            confidence=torch.stack(confs) if confs else None,
        )
