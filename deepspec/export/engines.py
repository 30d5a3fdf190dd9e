"""What SGLang and vLLM require of a draft export, as rules that cite the engine source they come from.

Each :class:`Rule` belongs to one engine, names what it checks, cites the engine file and commit whose
loader or worker code it mirrors (read through the project's source index; re-read those files before
changing a rule), and returns the problems it finds in an export folder. :func:`check_export` runs every
rule of an engine (``deepspec export --check sglang|vllm DIR``); :class:`ConformanceError` lists each
violation with its rule name and source, so a failure says which engine would refuse or misread what.

Architecture routing, per engine (the algorithm of an export is read from its architecture):

============  ===========================  ===========================  =================================
algorithm     SGLang                        vLLM                         slot convention (both engines)
============  ===========================  ===========================  =================================
eagle3        ``LlamaForCausalLMEagle3``    ``LlamaForCausalLMEagle3``   autoregressive
dflash        ``DFlashDraftModel``          ``DFlashDraftModel``         mask slot j predicts anchor+j
dspark        ``DSparkDraftModel``          ``Qwen3DSparkModel``         slot k predicts anchor+k+1
============  ===========================  ===========================  =================================
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENGINES = ("sglang", "vllm")
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Source:
    """One engine file at one commit."""

    repo: str
    path: str
    commit: str

    def __str__(self) -> str:
        return f"{self.repo}@{self.commit[:12]}:{self.path}"


def _sglang(path: str, commit: str) -> Source:
    return Source("sgl-project/sglang", f"python/sglang/srt/{path}", commit)


def _vllm(path: str, commit: str) -> Source:
    return Source("vllm-project/vllm", f"vllm/{path}", commit)


SGLANG_EAGLE3 = _sglang("models/llama_eagle3.py", "03d5a7771f6082e7737a5f19cae7d1e863087013")
SGLANG_LLAMA = _sglang(
    "models/llama.py", "bf7a0e237e8d5b2ce5402f5d2fafce31e012dbdf"
)  # layers_to_capture = id+1
SGLANG_DFLASH_WORKER = _sglang("speculative/dflash_worker.py", "0468412fb7dc9909923ee6b6c95cfcfca24cfe34")
# spec-v2 worker: "draft tokens are block positions 1: (pos 0 is the seeded bonus token)"; its block_size is
# --speculative-num-draft-tokens (warns when it differs from the config's block_size)
SGLANG_DFLASH_WORKER_V2 = _sglang(
    "speculative/dflash_worker_v2.py", "0057abea41fceae867b023fc2962c340e11990de"
)
SGLANG_DFLASH_UTILS = _sglang("speculative/dflash_utils.py", "00731f0bc9fa81c39802754fb4b62e9cce967582")
SGLANG_DFLASH_MODEL = _sglang("models/dflash.py", "7f151c5ebdb3af4467c2a5d3ccc5f54e71d2ba35")
SGLANG_DSPARK = _sglang("models/dspark.py", "37e23874aa15a7deb74084dd4fb72a5e7b73c147")
VLLM_EAGLE3 = _vllm("model_executor/models/llama_eagle3.py", "583507d13075783a12ccbd774575974d10ca4959")
# the V1 runner reads hf_config.eagle_aux_hidden_state_layer_ids (id j = output of layer j-1, 0 = embedding)
# and falls back to dflash_config.target_layer_ids (seen in a quoted excerpt of this file, not read whole)
VLLM_RUNNER = _vllm("v1/worker/gpu_model_runner.py", "4e1790651fc758c06c7a903dd4cd82364ac91b27")
VLLM_REGISTRY = _vllm("model_executor/models/registry.py", "bf8e76246223e2c5e9c4df0c72e24250e9f1db36")
VLLM_DFLASH = _vllm("v1/spec_decode/dflash.py", "01046b9a33846d0561525a552c3c540ef9f56db0")
VLLM_SPEC_UTILS = _vllm("v1/spec_decode/utils.py", "01046b9a33846d0561525a552c3c540ef9f56db0")
VLLM_DFLASH_MODEL = _vllm("model_executor/models/qwen3_dflash.py", "d952bda805e64a425276f59161a915d31abbfd13")
VLLM_DSPARK_MODEL = _vllm("model_executor/models/qwen3_dspark.py", "0302ff40439493d0db2e3bbfd509211703375d08")

#: architecture each engine routes our algorithms through
ARCHITECTURES: dict[str, dict[str, str]] = {
    "sglang": {
        "eagle3": "LlamaForCausalLMEagle3",
        "dflash": "DFlashDraftModel",
        "dspark": "DSparkDraftModel",
    },
    "vllm": {"eagle3": "LlamaForCausalLMEagle3", "dflash": "DFlashDraftModel", "dspark": "Qwen3DSparkModel"},
}
#: architectures an engine accepts for an algorithm (SGLang registers both DSpark names)
ACCEPTED: dict[str, dict[str, str]] = {
    "sglang": {
        "LlamaForCausalLMEagle3": "eagle3",
        "DFlashDraftModel": "dflash",
        "DSparkDraftModel": "dspark",
        "Qwen3DSparkModel": "dspark",
    },
    "vllm": {"LlamaForCausalLMEagle3": "eagle3", "DFlashDraftModel": "dflash", "Qwen3DSparkModel": "dspark"},
}
#: what each slot of a block predicts, as written in ``deepspec.slot_convention``
SLOT_CONVENTION = {"dflash": "mask slot j predicts anchor+j", "dspark": "slot k predicts anchor+k+1"}
#: Markov head types each engine builds (SGLang ``build_markov_head``; vLLM builds the vanilla head only).
#: Our ``rnn`` head is a GRU, a different design from SGLang's ``joint_proj`` RNN head: not servable.
MARKOV_HEADS = {"sglang": ("vanilla",), "vllm": ("vanilla",)}


class ConformanceError(ValueError):
    """An export breaks engine rules; the message lists each rule, its engine source and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: BF16, F16, F32, I64, BOOL...


@dataclass
class ExportView:
    """An export folder as the engines' loaders see it: the config and each tensor's name, shape, dtype."""

    path: Path
    cfg: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @classmethod
    def read(cls, path: str | Path) -> ExportView:
        from safetensors import safe_open

        p = Path(path)
        if not (p / CONFIG).is_file() or not (p / WEIGHTS).is_file():
            raise ConformanceError(f"{p}: an export needs {CONFIG} and {WEIGHTS}")
        cfg = json.loads((p / CONFIG).read_text(encoding="utf-8"))
        tensors = {}
        with safe_open(str(p / WEIGHTS), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                sl = f.get_slice(name)
                tensors[name] = TensorInfo(tuple(sl.get_shape()), str(sl.get_dtype()))
        return cls(p, cfg, tensors)

    @property
    def architecture(self) -> str:
        arch = self.cfg.get("architectures") or [""]
        return str(arch[0])

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.cfg
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


# --------------------------------------------------------------------------------------------------
# What the engines read: layer ids and the expected tensors
# --------------------------------------------------------------------------------------------------


def feature_layer_ids(cfg: dict[str, Any]) -> list[int]:
    """The 0-based "output of layer i" ids the export was trained on (our own reading of its config)."""
    view = ExportView(Path("."), cfg, {})
    for key in ("dflash_config.target_layer_ids", "eagle_config.eagle_aux_hidden_state_layer_ids"):
        ids = view.get(key)
        if isinstance(ids, list):
            return [int(i) for i in ids]
    raise ConformanceError(
        "config has neither dflash_config.target_layer_ids nor eagle_config.eagle_aux_hidden_state_layer_ids"
    )


def engine_capture_ids(cfg: dict[str, Any], engine: str) -> list[int]:
    """The target layers whose outputs the engine feeds the draft, in the order it concatenates them.

    Both engines capture each layer once, in ascending order. SGLang reads the nested Eagle3 ids as
    "output of layer i" and adds +1 itself (``layers_to_capture = [val + 1 ...]``, :data:`SGLANG_LLAMA`).
    vLLM's V1 runner reads a top-level ``eagle_aux_hidden_state_layer_ids`` as "input of layer i" (= output
    of layer i-1) and falls back to the nested ids *in that same convention* (:data:`VLLM_RUNNER`; the
    fallback as audited in issue 10). DFlash/DSpark ``target_layer_ids`` are "output of layer i" on both
    (vLLM adds +1 itself: :data:`VLLM_DFLASH_MODEL`).
    """
    view = ExportView(Path("."), cfg, {})
    if engine == "vllm" and view.get("eagle_config") is not None:
        top = view.get("eagle_aux_hidden_state_layer_ids")
        ids = top if isinstance(top, list) else view.get("eagle_config.eagle_aux_hidden_state_layer_ids")
        return sorted({int(i) - 1 for i in ids})
    return sorted(set(feature_layer_ids(cfg)))


def _layer_tensors(prefix: str, cfg: dict[str, Any], attn_in: int, qk_norm: bool) -> dict[str, tuple]:
    h, nh, nkv, hd, inter = (
        int(cfg["hidden_size"]),
        int(cfg["num_attention_heads"]),
        int(cfg["num_key_value_heads"]),
        int(cfg["head_dim"]),
        int(cfg["intermediate_size"]),
    )
    t = {
        f"{prefix}input_layernorm.weight": (h,),
        f"{prefix}self_attn.q_proj.weight": (nh * hd, attn_in),
        f"{prefix}self_attn.k_proj.weight": (nkv * hd, attn_in),
        f"{prefix}self_attn.v_proj.weight": (nkv * hd, attn_in),
        f"{prefix}self_attn.o_proj.weight": (h, nh * hd),
        f"{prefix}post_attention_layernorm.weight": (h,),
        f"{prefix}mlp.gate_proj.weight": (inter, h),
        f"{prefix}mlp.up_proj.weight": (inter, h),
        f"{prefix}mlp.down_proj.weight": (h, inter),
    }
    if qk_norm:
        t[f"{prefix}self_attn.q_norm.weight"] = (hd,)
        t[f"{prefix}self_attn.k_norm.weight"] = (hd,)
    return t


def expected_tensors(cfg: dict[str, Any], algorithm: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, kind) the engine's model declares for this config (kind: float | int64 | bool)."""
    h, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    k = len(feature_layer_ids(cfg))
    out: dict[str, tuple[tuple[int, ...], str]] = {"fc.weight": ((h, k * h), "float")}
    if algorithm == "eagle3":
        vd = int(cfg.get("draft_vocab_size") or vocab)
        out["midlayer.hidden_norm.weight"] = ((h,), "float")
        out.update({n: (s, "float") for n, s in _layer_tensors("midlayer.", cfg, 2 * h, False).items()})
        out.update({"norm.weight": ((h,), "float"), "lm_head.weight": ((vd, h), "float")})
        out.update({"d2t": ((vd,), "int64"), "t2d": ((vocab,), "bool")})
        return out
    out["hidden_norm.weight"] = ((h,), "float")
    for i in range(int(cfg["num_hidden_layers"])):
        out.update({n: (s, "float") for n, s in _layer_tensors(f"layers.{i}.", cfg, h, True).items()})
    out["norm.weight"] = ((h,), "float")
    if algorithm == "dspark":
        r = int(cfg["markov_rank"])
        out["markov_head.markov_w1.weight"] = ((vocab, r), "float")
        out["markov_head.markov_w2.weight"] = ((vocab, r), "float")
        if cfg.get("enable_confidence_head"):
            width = h + (r if cfg.get("confidence_head_with_markov") else 0)
            out["confidence_head.proj.weight"] = ((1, width), "float")
            out["confidence_head.proj.bias"] = ((1,), "float")
    return out


_KIND_DTYPES = {"float": ("BF16", "F16", "F32"), "int64": ("I64",), "bool": ("BOOL",)}


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    engine: str
    name: str
    what: str
    source: Source
    check: Callable[[ExportView, str], list[str]]  # (export, algorithm) -> problems
    algorithms: tuple[str, ...] = ("eagle3", "dflash", "dspark")


@dataclass(frozen=True)
class Violation:
    rule: Rule
    problem: str

    def __str__(self) -> str:
        return f"[{self.rule.engine}:{self.rule.name}] {self.problem} (rule: {self.rule.what}; {self.rule.source})"


def _architecture(engine: str) -> Callable[[ExportView, str], list[str]]:
    def check(view: ExportView, algorithm: str) -> list[str]:
        arch = view.architecture
        if arch == "DSparkDraftModel" and engine == "vllm":
            return [
                "architectures is ['DSparkDraftModel']: vLLM routes it to its DeepSeek-V4 DSpark model "
                "(DSparkDeepseekV4ForCausalLM, which reads hc_mult and crashes on a dense draft); "
                "the dense draft is 'Qwen3DSparkModel'"
            ]
        if arch not in ACCEPTED[engine]:
            return [
                f"architectures is {view.cfg.get('architectures')}: {engine} serves none of our drafts as that"
            ]
        return []

    return check


def _layer_ids_sorted_unique(view: ExportView, _algorithm: str) -> list[str]:
    ids = feature_layer_ids(view.cfg)
    if ids != sorted(set(ids)):
        return [
            f"target layer ids {ids} are not ascending and unique: the engine captures {sorted(set(ids))} "
            f"and concatenates them in that order, so the draft's fc reads misaligned features"
        ]
    return []


def _tensor_names(view: ExportView, algorithm: str) -> list[str]:
    want = expected_tensors(view.cfg, algorithm)
    problems = [f"missing tensor {n} {want[n][0]}" for n in sorted(set(want) - set(view.tensors))]
    problems += [
        f"unexpected tensor {n} (misnamed? the engine's model has no such parameter)"
        for n in sorted(set(view.tensors) - set(want))
    ]
    return problems


def _tensor_shapes_dtypes(view: ExportView, algorithm: str) -> list[str]:
    want = expected_tensors(view.cfg, algorithm)
    problems = []
    for name in sorted(set(want) & set(view.tensors)):
        shape, kind = want[name]
        info = view.tensors[name]
        if info.shape != shape:
            problems.append(f"tensor {name} has shape {info.shape}, expected {shape}")
        if info.dtype not in _KIND_DTYPES[kind]:
            problems.append(f"tensor {name} has dtype {info.dtype}, expected one of {_KIND_DTYPES[kind]}")
    return problems


def _markov_present(view: ExportView, _algorithm: str) -> list[str]:
    missing = [
        n for n in ("markov_head.markov_w1.weight", "markov_head.markov_w2.weight") if n not in view.tensors
    ]
    return [
        f"missing Markov tensor {n}: the engine does not check for it and serves a randomly initialised head"
        for n in missing
    ]


def _markov_head_type(engine: str) -> Callable[[ExportView, str], list[str]]:
    def check(view: ExportView, _algorithm: str) -> list[str]:
        kind = str(view.cfg.get("markov_head_type", "vanilla"))
        rank = view.cfg.get("markov_rank")
        problems = []
        if not isinstance(rank, int) or rank <= 0:
            problems.append(f"markov_rank is {rank!r}: the engine requires markov_rank > 0")
        if kind not in MARKOV_HEADS[engine]:
            problems.append(
                f"markov_head_type {kind!r}: {engine} serves {list(MARKOV_HEADS[engine])} from our exports"
            )
        return problems

    return check


def _confidence_fields(view: ExportView, _algorithm: str) -> list[str]:
    problems = []
    for key in ("enable_confidence_head", "confidence_head_with_markov"):
        if not isinstance(view.cfg.get(key), bool):
            problems.append(f"config {key} is {view.cfg.get(key)!r}, expected a bool the engine reads")
    return problems


def _dflash_fields(view: ExportView, _algorithm: str) -> list[str]:
    problems = []
    block = view.get("dflash_config.block_size", view.cfg.get("block_size"))
    if not isinstance(block, int) or block < 2:
        problems.append(f"block_size is {block!r}: the engine needs an int >= 2 (anchor + mask slots)")
    mask = view.get("dflash_config.mask_token_id")
    vocab = int(view.cfg.get("vocab_size", 0))
    if not isinstance(mask, int) or not 0 <= mask < vocab:
        problems.append(f"dflash_config.mask_token_id is {mask!r}: the engine needs an id in [0, {vocab})")
    ids = view.get("dflash_config.target_layer_ids")
    n = view.cfg.get("num_target_layers")
    if not isinstance(ids, list) or not ids:
        problems.append("dflash_config.target_layer_ids is missing: the engine would pick its own layers")
    elif isinstance(n, int) and not all(0 <= int(i) < n for i in ids):
        problems.append(f"dflash_config.target_layer_ids {ids} outside [0, num_target_layers={n})")
    return problems


def _slot_convention(view: ExportView, algorithm: str) -> list[str]:
    declared = view.get("deepspec.slot_convention")
    if declared != SLOT_CONVENTION[algorithm]:
        return [
            f"the draft was trained with slot convention {declared!r}, but the engine runs "
            f"{view.architecture} as {SLOT_CONVENTION[algorithm]!r}: every proposal would be read one "
            f"position off (accepted length near 1.0)"
        ]
    return []


def _eagle3_nested_ids(view: ExportView, _algorithm: str) -> list[str]:
    ids = view.get("eagle_config.eagle_aux_hidden_state_layer_ids")
    if not isinstance(ids, list) or not ids:
        return [
            "eagle_config.eagle_aux_hidden_state_layer_ids is missing: the engine would pick default layers"
        ]
    return []


def _eagle3_three_layers(view: ExportView, _algorithm: str) -> list[str]:
    ids = feature_layer_ids(view.cfg)
    if len(ids) != 3:
        return [
            f"{len(ids)} aux layers {ids}: SGLang builds the Eagle3 fc for exactly 3 (hidden_size_in * 3)"
        ]
    return []


def _eagle3_vllm_top_level(view: ExportView, _algorithm: str) -> list[str]:
    nested = view.get("eagle_config.eagle_aux_hidden_state_layer_ids") or []
    top = view.cfg.get("eagle_aux_hidden_state_layer_ids")
    want = [int(i) + 1 for i in nested]
    if top is None:
        return [
            "top-level eagle_aux_hidden_state_layer_ids is missing: vLLM then reads the nested ids as "
            f"'input of layer i', one layer early; write {want}"
        ]
    if list(top) != want:
        return [f"top-level eagle_aux_hidden_state_layer_ids is {top}, expected nested ids + 1 = {want}"]
    return []


def _rules() -> list[Rule]:
    rules: list[Rule] = []
    for engine, arch_src, dspark_src, eagle_src, dflash_src in (
        ("sglang", SGLANG_DSPARK, SGLANG_DSPARK, SGLANG_EAGLE3, SGLANG_DFLASH_UTILS),
        ("vllm", VLLM_REGISTRY, VLLM_DSPARK_MODEL, VLLM_EAGLE3, VLLM_DFLASH_MODEL),
    ):
        slot_src = SGLANG_DFLASH_WORKER_V2 if engine == "sglang" else VLLM_SPEC_UTILS
        rules += [
            Rule(engine, "architecture", "architectures routes to the engine's model for the algorithm",
                 arch_src, _architecture(engine)),
            Rule(engine, "layer-ids-sorted-unique", "target layers are captured once each, ascending",
                 SGLANG_LLAMA if engine == "sglang" else VLLM_DFLASH_MODEL, _layer_ids_sorted_unique),
            Rule(engine, "weight-names", "tensor names are the engine model's parameter names",
                 {"sglang": SGLANG_DFLASH_MODEL, "vllm": VLLM_DFLASH_MODEL}[engine], _tensor_names),
            Rule(engine, "weight-shapes-dtypes", "tensor shapes follow the config; floats, int64 d2t, bool t2d",
                 {"sglang": SGLANG_DFLASH_MODEL, "vllm": VLLM_DFLASH_MODEL}[engine], _tensor_shapes_dtypes),
            Rule(engine, "eagle3-aux-layer-ids", "eagle_config.eagle_aux_hidden_state_layer_ids (output of "
                 "layer i)", SGLANG_LLAMA if engine == "sglang" else eagle_src, _eagle3_nested_ids, ("eagle3",)),
            Rule(engine, "dflash-config", "block_size, dflash_config.mask_token_id and target_layer_ids",
                 dflash_src, _dflash_fields, ("dflash", "dspark")),
            Rule(engine, "dflash-slot-convention", "block [anchor, mask...]: slot 0 is not sampled, mask slot "
                 "j is the token at anchor+j", slot_src, _slot_convention, ("dflash",)),
            Rule(engine, "dspark-slot-convention", "every block slot k predicts anchor+k+1 (the anchor's too)",
                 dspark_src, _slot_convention, ("dspark",)),
            Rule(engine, "dspark-markov-head", "markov_rank > 0 and a head type the engine builds",
                 dspark_src, _markov_head_type(engine), ("dspark",)),
            Rule(engine, "dspark-markov-weights", "markov_head.markov_w1/markov_w2 present (not checked by the "
                 "engine: a missing one loads as random)", dspark_src, _markov_present, ("dspark",)),
            Rule(engine, "dspark-confidence", "enable_confidence_head / confidence_head_with_markov flags",
                 dspark_src, _confidence_fields, ("dspark",)),
        ]  # fmt: skip
    rules.append(
        Rule("sglang", "eagle3-three-aux-layers", "the Eagle3 fc reads exactly 3 captured layers",
             SGLANG_EAGLE3, _eagle3_three_layers, ("eagle3",))
    )  # fmt: skip
    rules.append(
        Rule("vllm", "eagle3-vllm-layer-shift", "top-level eagle_aux_hidden_state_layer_ids = nested ids + 1",
             VLLM_RUNNER, _eagle3_vllm_top_level, ("eagle3",))
    )  # fmt: skip
    return rules


RULES: list[Rule] = _rules()


def export_algorithm(view: ExportView, engine: str) -> str | None:
    """The algorithm an export is, from its architecture (None when the engine does not serve it)."""
    if view.architecture in ACCEPTED[engine]:
        return ACCEPTED[engine][view.architecture]
    return {"DSparkDraftModel": "dspark"}.get(view.architecture)


def check_export(path: str | Path, engine: str) -> list[Violation]:
    """Every rule of ``engine`` the export at ``path`` breaks (empty: the engine serves it as trained)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    view = ExportView.read(path)
    algorithm = export_algorithm(view, engine)
    arch_rule = next(r for r in RULES if r.engine == engine and r.name == "architecture")
    if algorithm is None:
        return [Violation(arch_rule, p) for p in arch_rule.check(view, "")]
    out: list[Violation] = []
    for rule in RULES:
        if rule.engine == engine and algorithm in rule.algorithms:
            try:
                problems = rule.check(view, algorithm)
            except (KeyError, TypeError, ValueError) as e:
                problems = [f"config cannot be read for this rule: {type(e).__name__}: {e}"]
            out += [Violation(rule, p) for p in problems]
    return out


def require_conformance(path: str | Path, engine: str) -> None:
    """Raise :class:`ConformanceError` listing every violation of ``engine``'s rules."""
    violations = check_export(path, engine)
    if violations:
        lines = "\n  ".join(str(v) for v in violations)
        raise ConformanceError(f"export {path} would not be served correctly by {engine}:\n  {lines}")
