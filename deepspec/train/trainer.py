"""The draft trainer: torchrun-compatible, DDP or FSDP2, online or cached features, exact resume.

The :class:`Trainer` lists its whole inventory as typed attributes and builds it in one readable
sequence in ``__init__`` (torchtitan's layout): distributed set-up -> target -> data -> features ->
draft (+ compile + parallel wrapper) -> optimizer + scheduler -> checkpointer (+ resume) -> metrics.
``train_step`` runs the micro-batches of one global batch (gradient accumulation), clips, steps.
With ``training.packing`` the micro-batches are packed rows of one fixed length, a fixed number of
rows each (:class:`~deepspec.data.sequences.PackedShape`; a step's last micro-batches may hold fewer);
``padding_fraction`` and tokens/s then describe that layout (real tokens over the rows' tokens).

FSDP2 (``training.parallelism: fsdp2``) shards the draft with ``fully_shard`` (each DFlash/DSpark
layer, then the root); with ``precision: bf16`` the gathered parameters are bf16 and gradients are reduced
in fp32 (the sharded master weights and the optimizer state stay fp32). Checkpoints
(:mod:`deepspec.train.checkpoint`) hold the full weights plus a DCP optimizer folder, so a run resumes
bit-exactly on the same world size and resumes on another one.

Launch: ``deepspec train -c RECIPE`` on one process, or ``torchrun --nproc-per-node N -m deepspec.cli
train -c RECIPE``; the standard RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR variables select the
process group (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepspec.config import Recipe
from deepspec.data.sequences import (
    PackedShape,
    ResumableBatchSampler,
    TokenizedSequence,
    load_sequences,
    token_frequencies,
)
from deepspec.devices import DistInfo, init_distributed
from deepspec.layout import RunLayout
from deepspec.target_model.model import TargetModel
from deepspec.train.checkpoint import Checkpointer, LoadedCheckpoint, set_rng_state
from deepspec.train.features import FeatureSource, OfflineFeatures, OnlineFeatures
from deepspec.train.metrics import MetricsLogger, peak_flops, tau_estimate

log = logging.getLogger(__name__)

# Testing aid: block forever right after checkpoint N is written, so a supervisor can SIGKILL the
# process at a known point (exact-resume tests). Never set in normal runs.
PAUSE_ENV = "DEEPSPEC_PAUSE_AFTER_CHECKPOINT"

DraftFactory = Callable[[Any, TargetModel], nn.Module]


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


# training.time_budget_minutes: steps skipped (compilation, allocator warm-up), then steps timed, before
# the plan is cut to what fits; the share of the rest of the budget that the plan may use (the rest is
# margin for checkpoints and slower steps).
BUDGET_WARMUP_STEPS = 2
BUDGET_TIMED_STEPS = 10
BUDGET_USABLE = 0.95


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine down to ``min_ratio``."""

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def default_draft_factory(cfg: Any, target: TargetModel) -> nn.Module:
    from deepspec.models import build_draft

    return build_draft(cfg, target)


@dataclass
class StepStats:
    """Sums over the micro-batches since the last log line (reduced over ranks when logged)."""

    loss: float = 0.0
    micro: int = 0
    tokens: int = 0  # real (non-padding) tokens
    padded: int = 0  # tokens including padding
    supervised: int = 0
    steps: int = 0
    grad_norm: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    acceptance: torch.Tensor | None = None
    time: float = 0.0


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    recipe: Recipe
    dist: DistInfo
    device: torch.device
    target: TargetModel
    tokenizer: Any
    features: FeatureSource
    sampler: ResumableBatchSampler
    draft: nn.Module  # the bare draft (what is saved)
    model: nn.Module  # the draft as trained (DDP / FSDP2 wrapper, or the draft itself)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpointer: Checkpointer
    metrics: MetricsLogger
    step: int
    total_steps: int

    def __init__(
        self,
        recipe: Recipe,
        draft_factory: DraftFactory | None = None,
        device: str | None = None,
        resume: bool = True,
        progress: bool = True,
        target: TargetModel | None = None,
        sequences: list[TokenizedSequence] | None = None,
    ):
        """``target`` / ``sequences`` may be given pre-built (benchmarks, tests); else the recipe's are loaded."""
        self.recipe = recipe
        self.layout = RunLayout.from_recipe(recipe)
        tc = recipe.training
        self.progress = progress
        self.dist, self.device = init_distributed(device)
        torch.manual_seed(tc.seed)

        # 1. target (frozen) and tokenizer
        from transformers import AutoTokenizer

        from deepspec.target_model.files import resolve_model_path

        algorithm = recipe.draft.algorithm
        self._given_sequences = sequences
        self.tokenizer = None
        if target is not None:
            self.target = target
        else:
            self.target = TargetModel.from_pretrained(
                recipe.target.model,
                recipe.draft.target_layer_ids,
                algorithm,
                device=self.device,
                dtype=None if recipe.target.dtype == "auto" else recipe.target.dtype,
                trust_remote_code=recipe.target.trust_remote_code,
            )
        if sequences is None:
            self.tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(recipe.target.model), trust_remote_code=recipe.target.trust_remote_code
            )

        # 2. data + features
        self.features = self._build_features()
        self.packed_shape = (
            PackedShape.for_training(self.features.lengths, tc.micro_batch_size, tc.micro_batch_tokens)
            if tc.packing
            else None
        )
        if self.packed_shape is not None:
            log.info(
                "training.packing: micro-batches of %d rows x %d tokens",
                self.packed_shape.rows, self.packed_shape.row_length,
            )  # fmt: skip
        self.sampler = ResumableBatchSampler(
            self.features.lengths, tc.global_batch_size, tc.micro_batch_size,
            self.dist.rank, self.dist.world_size, tc.seed, tc.micro_batch_tokens, self.packed_shape,
        )  # fmt: skip
        n = len(self.features.lengths)
        self.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * n / tc.global_batch_size))

        # 3. draft (fp32 master weights) and its parallel wrapper
        torch.manual_seed(tc.seed)
        self.draft = (draft_factory or default_draft_factory)(recipe.draft, self.target)
        self.draft.to(self.device, torch.float32)
        self._init_vocab_mapping()

        # 4. resume state (weights must be in place before FSDP2 shards them)
        self.checkpointer = Checkpointer(self.layout.checkpoints, self.dist.rank, self.dist.world_size,
                                         tc.keep_last, self.dist.barrier, recipe.storage.s3_endpoint_url)  # fmt: skip
        location = self.checkpointer.latest() if resume else None
        ckpt = self.checkpointer.load(location) if location is not None else None
        if ckpt is not None:
            self.draft.load_state_dict(ckpt.weights, strict=True)
        self.compiled = self._compile(self.draft)
        self.model = self._wrap(self.draft)

        # 5. optimizer + schedule
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel per step on CUDA, and no parameter-sized temporary (the foreach default has one)
        self.optimizer = torch.optim.AdamW(
            params,
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            betas=(0.9, 0.95),
            fused=self.device.type == "cuda",
        )
        warmup = int(tc.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup, self.total_steps, tc.min_lr_ratio)
        )
        self.clock: Callable[[], float] = time.perf_counter  # the time budget's clock (tests replace it)
        self.step = 0
        self.tokens_seen = 0  # real tokens of all ranks, up to the last log line or checkpoint
        self._tokens_pending = 0  # this rank's real tokens since then
        if ckpt is not None:
            self._restore(ckpt)
            log.info("resumed from %s at step %d", location, self.step)

        # 6. metrics (S3 outputs: written locally, uploaded next to the checkpoints at each save)
        if self.checkpointer.remote:
            self.log_dir = self.layout.work_dir(self.layout.checkpoint("logs"))  # a stable local folder
        else:
            self.log_dir = Path(self.layout.checkpoints)
        if self.dist.is_main:
            self.checkpointer.download_logs(self.log_dir)  # a resumed run appends to the uploaded log
        self.metrics = MetricsLogger(self.log_dir, enabled=self.dist.is_main)
        self.autocast_dtype = (
            torch.bfloat16 if (self.device.type == "cuda" and tc.precision == "bf16") else None
        )
        n_draft = sum(p.numel() for p in params)
        n_target = sum(p.numel() for p in self.target.parameters())
        online = recipe.features.mode == "online"
        # Rough FLOPs per real token: draft fwd+bwd, target forward when online.
        self.flops_per_token = 6 * n_draft + (2 * n_target if online else 0)
        self.peak_flops = peak_flops(self.device)

    # ---- building blocks ------------------------------------------------------------------------

    def _build_features(self) -> FeatureSource:
        r = self.recipe
        if r.features.mode == "offline":
            from deepspec.features.cache import FeatureCache, cache_identity

            cache = FeatureCache(self.layout.features or "", r.storage.s3_endpoint_url)
            cache.validate(
                cache_identity(r, self.target, self.tokenizer), needed_layer_ids=self.target.layer_ids
            )
            return OfflineFeatures(cache, self.target.layer_ids, self.device, self.target.dtype)
        if self._given_sequences is not None:
            online = OnlineFeatures(self.target, self._given_sequences)
        else:
            sequences = load_sequences(r, self.tokenizer, progress=self.progress and self.dist.is_main)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            online = OnlineFeatures(self.target, sequences, pad_id=pad)
        if r.training.packing:
            online.check_packing()
        return online

    def _init_vocab_mapping(self) -> None:
        """Eagle3 with a reduced vocabulary: d2t/t2d from supervised-token frequencies of the data."""
        cfg = self.recipe.draft
        if (
            cfg.algorithm != "eagle3"
            or not cfg.draft_vocab_size
            or not hasattr(self.draft, "set_vocab_mapping")
        ):
            return
        from deepspec.models.eagle3 import build_vocab_mapping

        counts = token_frequencies(self.features.sequences, self.target.vocab_size)  # type: ignore[attr-defined]
        d2t, t2d = build_vocab_mapping(counts, cfg.draft_vocab_size)
        self.draft.set_vocab_mapping(d2t.to(self.device), t2d.to(self.device))

    def _compile(self, draft: nn.Module) -> list[str]:
        """``torch.compile`` the draft's repeated blocks in place (names of the compiled modules).

        Units: each decoder layer of DFlash/DSpark, and the MLP / RMSNorm blocks elsewhere (Eagle3 calls
        its layer's parts one by one). Module names and state-dict keys are unchanged (``Module.compile``).
        """
        mode = self.recipe.training.compile
        if mode == "auto":  # where it was measured to help: Eagle3 on CUDA (bench/README.md, +5 %)
            mode = "on" if self.device.type == "cuda" and self.recipe.draft.algorithm == "eagle3" else "off"
        if mode == "off":
            return []
        from deepspec.models.layers import MLP, RMSNorm

        layers = {id(m) for m in getattr(draft, "layers", [])}
        done: list[str] = []
        for name, module in draft.named_modules():
            if any(name.startswith(d + ".") for d in done):
                continue  # inside a compiled unit
            if id(module) in layers or isinstance(module, (MLP, RMSNorm)):
                module.compile(dynamic=True)  # lengths and micro-batch sizes vary
                done.append(name)
        return done

    def _wrap(self, draft: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return draft
        if self.recipe.training.parallelism == "fsdp2":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy()  # fp32 parameters and reduction
            if self.recipe.training.precision == "bf16":
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            # DFlash/DSpark: one unit per decoder layer (gathered only while that layer runs), then the
            # root. Eagle3 calls its single layer's parts one by one during the unroll, outside the
            # layer's forward, so its layer stays in the root unit.
            if self.recipe.draft.algorithm != "eagle3":
                for layer in getattr(draft, "layers", []):
                    fully_shard(layer, mp_policy=mp)
            return fully_shard(draft, mp_policy=mp)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(draft, device_ids=ids)

    # ---- state ----------------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "world_size": self.dist.world_size,
            "parallelism": self.recipe.training.parallelism if self.dist.enabled else None,
        }

    def _restore(self, ckpt: LoadedCheckpoint) -> None:
        """Counters, schedule, data position, optimizer (resharded by DCP) and this rank's RNG."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = ckpt.trainer_state
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        optim = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.load(optim, checkpoint_id=str(ckpt.optimizer_dir), no_dist=not self.dist.enabled)
        set_optimizer_state_dict(self.model, self.optimizer, optim["optimizer"])
        if ckpt.rng is not None and state["world_size"] == self.dist.world_size:
            set_rng_state(ckpt.rng)
        else:  # another world size: same data and weights, fresh (seeded) randomness per rank
            log.warning(
                "checkpoint written by %d processes, resumed on %d: data order, weights and optimizer are "
                "restored; random draws (e.g. anchors) are reseeded, so the run is not bit-identical",
                state["world_size"],
                self.dist.world_size,
            )
            torch.manual_seed(self.recipe.training.seed + 1_000_003 * self.step + self.dist.rank)
        if self.checkpointer.remote:
            shutil.rmtree(ckpt.path, ignore_errors=True)  # this rank's download of the S3 checkpoint

    def _full_weights(self) -> dict[str, torch.Tensor]:
        """The draft's weights in full on rank 0, fp32 on the CPU (gathers FSDP2 shards; call on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def _write_optimizer(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.save(state, checkpoint_id=str(folder), no_dist=not self.dist.enabled)

    def save(self) -> str:
        self._sync_tokens()
        weights = self._full_weights()
        config = None
        if self.dist.is_main:
            config = dict(self.draft.draft_config()) if hasattr(self.draft, "draft_config") else {}
            config["deepspec_training"] = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "world_size": self.dist.world_size,
                "recipe": self.recipe.model_dump(mode="json"),
            }
        path = self.checkpointer.save(
            self.step,
            config,
            weights if self.dist.is_main else None,
            self._trainer_state() if self.dist.is_main else None,
            self._write_optimizer,
        )
        if self.dist.is_main:
            self.checkpointer.upload_logs(self.log_dir)
        pause = os.environ.get(PAUSE_ENV)
        if pause and int(pause) == self.step:
            threading.Event().wait()  # blocked until killed (testing aid, see PAUSE_ENV)
        return path

    def _sync_tokens(self) -> None:
        """Add every rank's real tokens since the last sync to ``tokens_seen`` (call on every rank)."""
        pending = torch.tensor([self._tokens_pending], dtype=torch.int64)
        if self.dist.enabled:
            pending = pending.to(self.device)
            dist.all_reduce(pending)
        self.tokens_seen += int(pending.item())
        self._tokens_pending = 0

    # ---- steps ----------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward_backward(
        self, micro_batch: list[int] | list[list[int]], scale: float, sync: bool, stats: StepStats
    ) -> None:
        """One micro-batch: dataset indices, or with packing its rows (lists of indices)."""
        if self.packed_shape is not None:
            batch = self.features.packed_batch(micro_batch, self.packed_shape)  # type: ignore[arg-type]
        else:
            batch = self.features.batch(micro_batch)  # type: ignore[arg-type]
        no_sync = getattr(self.model, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(sync)
        with ctx:
            with self._autocast():
                out = self.model(batch)
            (out.loss * scale).backward()
        stats.loss += float(out.loss.detach())
        stats.micro += 1
        real = int(batch.attention_mask.sum())
        stats.tokens += real
        stats.padded += batch.attention_mask.numel()
        self._tokens_pending += real
        stats.supervised += int((batch.loss_mask.bool() & batch.attention_mask.bool()).sum())
        for k, v in out.metrics.items():
            stats.metrics[k] = stats.metrics.get(k, 0.0) + float(v)
        if out.position_acceptance is not None:
            acc = out.position_acceptance.detach().float().cpu()
            stats.acceptance = acc if stats.acceptance is None else stats.acceptance + acc

    def train_step(self, stats: StepStats) -> None:
        micro_batches: list[Any] = (
            self.sampler.next_packed_global_batch()
            if self.packed_shape is not None
            else self.sampler.next_global_batch()
        )
        self.optimizer.zero_grad(set_to_none=True)
        for j, micro in enumerate(micro_batches):
            self.forward_backward(micro, 1.0 / len(micro_batches), j == len(micro_batches) - 1, stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.recipe.training.grad_clip
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        stats.steps += 1
        stats.grad_norm += float(grad_norm)

    def _reduce(self, stats: StepStats) -> dict[str, Any]:
        keys = sorted(stats.metrics)
        g = 0 if stats.acceptance is None else stats.acceptance.numel()
        head = [stats.loss, stats.micro, stats.tokens, stats.supervised, stats.padded]
        vec = torch.tensor(
            head + [stats.metrics[k] for k in keys] + (stats.acceptance.tolist() if g else []),
            dtype=torch.float64,
        )
        if self.dist.enabled:
            vec = vec.to(self.device)
            dist.all_reduce(vec)
            vec = vec.cpu()
        micro = max(vec[1].item(), 1.0)
        out: dict[str, Any] = {
            "loss": vec[0].item() / micro,
            "tokens": int(vec[2].item()),
            "supervised_tokens": int(vec[3].item()),
            "padding_fraction": 1.0 - vec[2].item() / max(vec[4].item(), 1.0),
        }
        n = len(head)
        for i, k in enumerate(keys):
            out[k] = vec[n + i].item() / micro
        if g:
            acc = vec[n + len(keys) :].float() / micro
            out["tau"] = tau_estimate(acc)
            out["acceptance"] = [round(a, 4) for a in acc.tolist()]
        return out

    def _log(self, stats: StepStats, bar: Any) -> None:
        values = self._reduce(stats)
        self._sync_tokens()
        dt = max(stats.time, 1e-9)
        tok_s = values["tokens"] / dt
        values.update(
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=stats.grad_norm / max(stats.steps, 1),
            tokens_per_s=tok_s,
            tokens_seen=self.tokens_seen,
            step_time_s=dt / max(stats.steps, 1),
            epoch=self.sampler.epoch_float,
        )
        if self.device.type == "cuda":
            values["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.peak_flops:  # known for the GPUs in metrics.PEAK_BF16_FLOPS
            values["mfu"] = tok_s * self.flops_per_token / (self.peak_flops * self.dist.world_size)
        self.metrics.log(self.step, values)
        if bar is not None:
            post = {"loss": f"{values['loss']:.3f}", "tok/s": f"{tok_s:,.0f}"}
            if "mfu" in values:
                post["mfu"] = f"{100 * values['mfu']:.1f}%"
            if "tau" in values:
                post["tau"] = f"{values['tau']:.2f}"
            bar.set_postfix(post)
        self.last_metrics = values

    # ---- loop -----------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        tc = self.recipe.training
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True
            )
        self.last_metrics: dict[str, Any] = {}
        stats = StepStats()
        self.model.train()
        budget = _TimeBudget(tc.time_budget_minutes, self.step, self.clock)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            self.train_step(stats)
            stats.time += time.perf_counter() - t0
            spent = budget.after_step(self.step)
            if budget.timed_step_s is not None and not budget.planned:
                self._fit_to_budget(budget, bar)
            stop = budget.enabled and self._max_over_ranks(float(spent)) > 0  # all ranks stop at one step
            last = self.step == self.total_steps or stop
            if bar is not None:
                bar.update(1)
            if self.step % tc.log_every == 0 or last:
                self._log(stats, bar)
                stats = StepStats()
            if self.step % tc.save_every == 0 or last:
                self.save()
            if stop:
                log.warning(
                    "training.time_budget_minutes (%s) spent: stopped at step %d of %d with a checkpoint",
                    tc.time_budget_minutes, self.step, self.total_steps,
                )  # fmt: skip
                break
        if bar is not None:
            bar.close()
        self.metrics.close()
        return self.last_metrics

    def _fit_to_budget(self, budget: _TimeBudget, bar: Any) -> None:
        """Cut the planned steps to what the rest of the time budget holds at the timed pace (the slowest
        rank's), and re-plan the warmup + cosine schedule over them so that it still completes."""
        budget.planned = True
        # Every rank must plan the same steps (a rank that leaves the loop first leaves the others waiting in
        # a collective): the slowest rank's pace and the least time left of any rank (each rank's budget
        # counts from its own first step, so the ranks' remaining times differ slightly).
        step_s = self._max_over_ranks(budget.timed_step_s or 0.0)
        remaining_s = -self._max_over_ranks(-budget.remaining_s())
        fits = self.step + int(BUDGET_USABLE * remaining_s / max(step_s, 1e-9))
        if fits >= self.total_steps:
            return
        tc = self.recipe.training
        log.warning(
            "training.time_budget_minutes %s: %d planned steps do not fit at %.3f s/step; planning %d",
            tc.time_budget_minutes, self.total_steps, step_s, max(fits, self.step + 1),
        )  # fmt: skip
        self.total_steps = max(fits, self.step + 1)
        self.scheduler.lr_lambdas = [
            lr_lambda(int(tc.warmup_ratio * self.total_steps), self.total_steps, tc.min_lr_ratio)
        ]
        if bar is not None:
            bar.total = self.total_steps
            bar.refresh()

    def _max_over_ranks(self, value: float) -> float:
        """The largest ``value`` of all ranks (this rank's own when not distributed)."""
        if not self.dist.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def close(self) -> None:
        if self.dist.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class _TimeBudget:
    """Wall-clock accounting of ``training.time_budget_minutes`` from the first step of this process."""

    def __init__(self, minutes: float | None, first_step: int, clock: Callable[[], float]) -> None:
        self.enabled = minutes is not None
        self.budget_s = 60.0 * minutes if minutes is not None else math.inf
        self.first_step = first_step
        self.clock = clock
        self.start = clock()
        self.timed_from: float | None = None
        self.timed_step_s: float | None = None  # seconds per step over the timed steps
        self.planned = not self.enabled  # no budget: nothing to plan

    def remaining_s(self) -> float:
        return self.budget_s - (self.clock() - self.start)

    def after_step(self, step: int) -> bool:
        """Time the step that just ended; True when the budget is spent."""
        if not self.enabled:
            return False
        now = self.clock()
        done = step - self.first_step
        if done == BUDGET_WARMUP_STEPS:
            self.timed_from = now
        elif done == BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS and self.timed_from is not None:
            self.timed_step_s = (now - self.timed_from) / BUDGET_TIMED_STEPS
        return now - self.start >= self.budget_s
