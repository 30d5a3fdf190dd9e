"""What the batched drafters share: their proposal type and the CUDA-graph capture of their steps.

:class:`GraphedDrafter` is the base of :class:`~deepspec.eval.eagle3_batched.Eagle3BatchedDrafter` and
:class:`~deepspec.eval.block_batched.BlockBatchedDrafter`: each fixed-shape step (a ``propose`` or an
``extend`` of one ``(batch, width, window)``) is captured once as a CUDA graph, on a side stream after two
warm-up runs, in one memory pool per drafter, and replayed with its inputs copied into the captured
buffers (as :class:`~deepspec.decode.core.DecodeCore` does for the target). A step that cannot be
captured is logged and the drafter keeps running eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deepspec.decode.core import kv_bucket

log = logging.getLogger(__name__)


@dataclass
class BatchedProposal:
    """Draft tokens of every row for one round.

    tokens: [B, P] target ids; probs: [B, P, V] the target-vocabulary distributions they were drawn
    from (None at temperature 0, where verification only compares with the target's argmax).
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor | None, ...]


class GraphedDrafter:
    """Captures a batched drafter's fixed-shape steps as CUDA graphs, one per shape key, and replays them.

    Subclasses set ``device``, ``cuda_graphs`` (through :meth:`_init_graphs`) and name in :meth:`_state`
    the per-row tensors a stateful step advances (buffers written at positions derived from them
    need no undo: the replay writes the same entries again).
    """

    device: torch.device
    cuda_graphs: bool
    rows: int  # rows of the draft cache
    max_len: int  # positions per row

    def _init_graphs(self, cuda_graphs: bool | None) -> None:
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a draft on a CUDA device")
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.graph_replays = 0

    def _state(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @torch.no_grad()
    def propose(
        self,
        anchors: torch.Tensor,
        num_proposals: int,
        temperature: float,
        uniforms: torch.Tensor | None = None,
        needed: int | None = None,
    ) -> BatchedProposal:
        """Propose ``num_proposals`` tokens after ``anchors`` [B] (device) for rows ``0..B-1``.

        ``uniforms`` [B, num_proposals]: one draw per slot from each row's generator (needed at
        temperature > 0). ``needed``: a host-known bound on every row's committed length plus the
        proposals (sets the attention window, bucketed; default the whole cache). Committed state is not
        changed. The subclass's :meth:`_draft` is replayed as the graph of its shape on CUDA, or run
        eagerly.
        """
        self._check_proposals(num_proposals)
        b = anchors.shape[0]
        if b > self.rows:
            raise ValueError(f"{b} rows requested from a {self.rows}-row draft cache")
        sampled = temperature > 0
        if sampled and uniforms is None:
            raise ValueError("sampled proposals need uniforms [B, num_proposals] from the rows' generators")
        kv_len = kv_bucket(needed, self.max_len) if needed is not None else self.max_len
        u = uniforms if sampled else torch.zeros(b, num_proposals, device=self.device)

        def run(a: torch.Tensor, uu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return self._draft(a, num_proposals, temperature, uu, kv_len)

        if self.cuda_graphs:
            graph = self._graph(("propose", b, num_proposals, kv_len, float(temperature)), (anchors, u), run)
            if graph is not None:
                tokens, probs = graph.outputs
                return BatchedProposal(tokens, probs)  # type: ignore[arg-type]
        tokens, probs = run(anchors, u)
        return BatchedProposal(tokens, probs)

    def _check_proposals(self, num_proposals: int) -> None:
        """Refuse a proposal count the drafter cannot make (default: any count is fine)."""

    def _draft(
        self, anchors: torch.Tensor, steps: int, temperature: float, u: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fixed-shape drafting body: tokens [B, steps] and probs [B, steps, V] (None at T = 0)."""
        raise NotImplementedError

    def _graph(
        self,
        key: tuple,
        inputs: tuple[torch.Tensor, ...],
        fn: Callable[..., tuple],
        stateful: bool = False,
    ) -> _Graph | None:
        """Replay (capturing on first use) the graph of ``fn`` for ``key``; None when capture failed.

        ``stateful``: ``fn`` advances the tensors of :meth:`_state`; the warm-up runs are undone so
        that the replay after capture applies the step exactly once.
        """
        graph = self._graphs.get(key)
        if graph is None:
            state = self._state()
            saved = tuple(x.clone() for x in state)
            static = tuple(x.clone() for x in inputs)
            try:
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        fn(*static)
                        if stateful:
                            _restore(state, saved)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph, pool=self._pool):
                    outputs = fn(*static)
            except RuntimeError:  # an op that cannot be captured: keep working, eagerly, and say so
                log.exception("CUDA graph capture of the draft step %s failed; running eagerly", key)
                _restore(state, saved)
                self.cuda_graphs = False
                return None
            graph = _Graph(cuda_graph, static, tuple(outputs))
            self._graphs[key] = graph
        for buf, x in zip(graph.inputs, inputs, strict=True):
            buf.copy_(x)
        graph.graph.replay()
        self.graph_replays += 1
        return graph

    @property
    def graph_shapes(self) -> list[tuple]:
        return sorted(self._graphs, key=str)


def _restore(state: tuple[torch.Tensor, ...], saved: tuple[torch.Tensor, ...]) -> None:
    for buf, old in zip(state, saved, strict=True):
        buf.copy_(old)
