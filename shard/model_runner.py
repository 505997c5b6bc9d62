"""The model side of a step: the KV cache, the step's input tensors, the forward and its logits.

Rank 0's engine calls `ModelRunner.step`; under tensor parallelism it broadcasts the step's inputs
and every other rank runs the same `_forward` on them in `run_worker`, so there is one step path.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from shard.memory import TRIM_INTERVAL_S, release_free_memory
from shard.models.llama import AttentionBatch, LlamaModel, PromptChunk
from shard.parallel import broadcast_step
from shard.sequence import Sequence

log = logging.getLogger("sluice.engine")

# Compiled decode steps pad the context to a multiple of this: the context length is a dynamic
# dimension of the graph, and padding keeps it clear of the sizes 0 and 1 that torch specializes.
# Every padded key is read in every layer: at batch 48, 16 instead of 64 made steps 5-10% shorter at
# contexts of 30-90 tokens (bench/RESULTS.md, session 19).
L_ALIGN = 16

# Compiled decode steps of 2 or more rows run their layers in groups of this many, one graph per group,
# so that the engine can let an urgent newcomer's prompt in between two groups (Engine._between_layers):
# SmolLM2's 30 layers make 3 groups, and a newcomer waits for at most a third of a decode step (~95 ms
# at batch 49) instead of all of it. Smaller groups would cut that wait further, for more graphs to
# compile and more boundaries per step, where the hidden states leave one graph and enter the next
# unfused. A step of one row is one graph from the ids to the logits (OneRowStep).
LAYERS_PER_COMPILED_GROUP = 10

# A stage of a step: runs some consecutive layers, (x, cos, sin, batch, kv_caches) -> x.
LayerGroup = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionBatch, list], torch.Tensor]
# A whole step of one row: (ids, positions, batch, kv_caches) -> float32 logits [1, vocab].
OneRowStep = Callable[[torch.Tensor, torch.Tensor, AttentionBatch, list], torch.Tensor]


class CompiledDecode(NamedTuple):
    """The compiled decode steps: `single` for a step of one row (embeddings, every layer and the logits in
    one graph), `batched` the layer groups for steps of more rows."""
    single: OneRowStep
    batched: list[LayerGroup]


@dataclass
class StepInputs:
    """One step's tensors, as rank 0 broadcasts them to the other tensor-parallel ranks."""

    ids: torch.Tensor  # [T] every scheduled token, sequence after sequence
    positions: torch.Tensor  # [T]
    batch: AttentionBatch
    rows: list[int]  # rows of the hidden states that need logits: samplers first, then prompt logprobs
    compiled: bool = False  # through the compiled decode graph (decided once, when the tensors are built)


@dataclass
class PrefillRows:
    """Rows of a step that give prompt logprobs: the hidden-state rows, and the prompt token each predicts."""

    seq: Sequence
    rows: list[int]
    targets: list[int]


def allocate_kv_caches(model: LlamaModel, num_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # One K and one V tensor per layer (not one big tensor): writes stay in place. Each
    # tensor-parallel rank holds only its own KV heads. zero_() writes every page now: a lazily
    # mapped cache would grow the process's resident memory block by block under load, up to the
    # whole cache, and an out-of-memory would come late instead of at start-up.
    cfg, device = model.cfg, model.embed_tokens.device
    shape = (num_slots, model.tp.kv_heads_per_rank(cfg.num_kv_heads), cfg.head_dim)
    dtype = model.kv_cache_dtype or model.dtype
    return [(torch.empty(shape, dtype=dtype, device=device).zero_(),
             torch.empty(shape, dtype=dtype, device=device).zero_()) for _ in range(cfg.num_layers)]


def layer_groups(model: LlamaModel, per_group: int) -> list[LayerGroup]:
    """The model's layers as consecutive groups of `per_group` (the last may be shorter)."""
    n = len(model.layers)

    def group(start: int, end: int) -> LayerGroup:
        def run(x, cos, sin, batch, kv_caches):
            return model.run_layers(x, cos, sin, batch, kv_caches, start, end)
        return run

    return [group(start, min(start + per_group, n)) for start in range(0, n, per_group)]


# Inductor's C++ wrapper calls the kernels without Python in between: ~10% per decode step at batch 1
# and 16 (bench/bench_levers.py), for ~25% more compile time, which the background compile hides.
# A module value so that a benchmark can compare it off.
CPP_WRAPPER = True


def configure_inductor(model: LlamaModel) -> None:
    """Inductor's settings for the decode graphs, in the calling thread: inductor's config is
    thread-local (torch 2.13), and graphs compile in whichever thread first runs them (the background
    compile's own, see ModelRunner.warm_up). Set only in the engine's thread, the background compile
    ran without freezing or the C++ wrapper, its steps 1.35x longer at batch 16 (117.9 vs 86.8 ms)."""
    import torch._inductor.config

    # Freezing makes the weights constants that inductor packs once for the CPU matmul libraries:
    # 1.2x over eager without it, 1.6x with it (SmolLM2 bf16, batch 1-4). Only where the libraries do
    # the matmuls: narrow weights go to our own kernels (shard/models/cpu_kernels.py), where freezing
    # gained nothing (batch 16: 61.2 ms frozen, 60.2 not) and cost the restart its compiled-graph cache:
    # inductor compiled again for 29 s where the unfrozen graphs came from its cache in 9.7 s.
    # torch.compile(options={"freezing": True}) was silently ignored (torch 2.13).
    torch._inductor.config.freezing = model.layers[0].qkv_proj.dtype == model.dtype
    torch._inductor.config.cpp_wrapper = CPP_WRAPPER


def compile_decode(model: LlamaModel) -> CompiledDecode:
    """torch.compile of the decode-only steps. Eager, each step pays a fixed ~8-15 ms of Python and ATen
    dispatch over ~700 small ops; the compiled graphs fuse them. One graph for batch 1, from the ids to the
    logits (LlamaModel.decode_logits), and one per layer group (LAYERS_PER_COMPILED_GROUP) for every batch of
    2 or more (a dynamic dimension, measured as fast as one graph per padded batch size, and compiled once
    instead of seven times), whose embeddings, rotary tables and logits stay eager (a few small ops).
    See ModelRunner.warm_up."""
    if model.tp.size > 1:
        raise ValueError("--compile supports --num-shard 1 only: the tensor-parallel all_reduce is not traced")
    import torch._dynamo  # noqa: F401  (ModelRunner._mark_dynamic)

    configure_inductor(model)  # in the engine's thread too, where a graph whose guards fail later recompiles
    groups = layer_groups(model, LAYERS_PER_COMPILED_GROUP)
    # The groups share one function's code, and dynamo's limit on graphs per code (8) would send a
    # deep model's later groups back to eager: room for every graph.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(groups))
    return CompiledDecode(single=torch.compile(model.decode_logits, dynamic=False),
                          batched=[torch.compile(g, dynamic=False) for g in groups])


class ModelRunner:
    """Owns the KV cache and runs the model; knows sequences only to read their tokens and blocks."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, compile: bool = False) -> None:
        self.model = model
        self.block_size = block_size
        self.device = model.embed_tokens.device
        self.kv_caches = allocate_kv_caches(model, num_blocks * block_size)
        self._compiler: CompiledDecode | None = compile_decode(model) if compile else None
        # The compiled layer groups once warm_up has built them; None: eager. Benchmarks swap them.
        self.compiled: CompiledDecode | None = None
        # Eager steps run one layer at a time: a check between two layers costs microseconds.
        self._eager = layer_groups(model, 1)

    def warm_up(self, background: bool = False) -> None:
        """Compile the decode graphs, batch 1 and the groups' for more rows (minutes in all on a small CPU)
        by running them once on dummy rows, then use them: compiled lazily, the first request of each
        kind would stall every stream in its batch that long. The dummy rows write their K/V into block 0, which the block
        manager never hands out, so this may run in a thread of its own while the engine serves."""
        if self._compiler is None:
            return
        configure_inductor(self.model)
        if background:
            # Serving comes first: the lowest CPU priority for this thread (Linux nices threads one
            # by one), and inductor's kernel compiles in this process instead of a worker per core.
            import torch._inductor.config

            torch._inductor.config.compile_threads = 1
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
        try:
            self._warm_up(self._compiler)
        except Exception:
            if not background:
                raise
            log.exception("compiling the decode graphs failed: serving eagerly")
            return
        self.compiled = self._compiler

    def _warm_up(self, compiled: CompiledDecode) -> None:

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=self.device)

        t0 = time.monotonic()
        with torch.inference_mode():
            for batch_size in (1, 2):
                # Shaped like prepare's tensors (distinct, contiguous): else the guards differ.
                mask = (torch.arange(L_ALIGN, device=self.device) == 0).repeat(batch_size, 1, 1)
                batch = AttentionBatch(zeros(batch_size), zeros(batch_size, L_ALIGN), mask)
                self._mark_dynamic(batch)
                if batch_size == 1:
                    compiled.single(zeros(1), zeros(1), batch, self.kv_caches)
                else:
                    self._hidden(zeros(batch_size), zeros(batch_size), batch, compiled.batched)
        log.info("compiled the decode graphs in %.1fs: decode steps use them from now on", time.monotonic() - t0)

    @staticmethod
    def _mark_dynamic(batch: AttentionBatch) -> None:
        torch._dynamo.mark_dynamic(batch.kv_slots, 1)
        torch._dynamo.mark_dynamic(batch.mask, 2)
        if batch.slot_mapping.shape[0] > 1:  # batch 1 keeps a graph of its own (torch specializes size 1 anyway)
            for t in (batch.slot_mapping, batch.kv_slots, batch.mask):
                torch._dynamo.mark_dynamic(t, 0)

    # --- rank 0 ---------------------------------------------------------------------------
    def step(self, scheduled: list[tuple[Sequence, int]], between_layers: Callable[[], None] | None = None,
             ) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run the scheduled tokens; record prompt logprobs on the sequences that asked for them.
        Returns the sequences that sample this step (their prompt is complete) and their float32
        logits [len(samplers), vocab] on the CPU (None when none samples). `between_layers` is
        called between two layer groups (see `_hidden`); tensor parallelism takes none."""
        inputs, samplers, prefill = self.prepare(scheduled)
        logits = self.run(inputs, between_layers)
        if prefill:
            logprobs = torch.log_softmax(logits[len(samplers):], dim=-1)
            at = 0
            for p in prefill:
                got = logprobs[at : at + len(p.rows)].gather(1, torch.tensor(p.targets).unsqueeze(1))
                p.seq.prefill.extend(got[:, 0].tolist())
                at += len(p.rows)
        return samplers, None if logits is None else logits[: len(samplers)]

    def run(self, inputs: StepInputs, between_layers: Callable[[], None] | None = None) -> torch.Tensor | None:
        """Broadcast the step to the other ranks (if any), run it here too; logits on the CPU."""
        if self.model.tp.size > 1:
            broadcast_step(inputs)
            # The other ranks run the step in lockstep (collectives in every layer): a step run by
            # rank 0 alone in between would wait on them for ever.
            assert between_layers is None, "no hook between layers under tensor parallelism"
        logits = self._forward(inputs, between_layers)
        return None if logits is None else logits.cpu()

    def release_workers(self) -> None:
        """Tell the other tensor-parallel ranks there are no more steps (their run_worker returns)."""
        if self.model.tp.size > 1:
            broadcast_step(None)

    # --- every rank -----------------------------------------------------------------------
    def _forward(self, inputs: StepInputs, between_layers: Callable[[], None] | None = None) -> torch.Tensor | None:
        if inputs.compiled and inputs.ids.shape[0] == 1:
            # One graph from the ids to the logits. Its guards go unchecked: dynamo's check of the ~300
            # weight and cache tensors took ~0.1-0.3 ms of a ~7 ms step (bench/RESULTS.md, session 26), and
            # nothing they guard changes after warm-up (the same model, caches and dtypes; the context
            # length is a dynamic dimension). Where the code has several compiled entries (several models
            # in one process), dynamo still checks the guards that tell them apart.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                logits = self.compiled.single(inputs.ids, inputs.positions, inputs.batch, self.kv_caches)
            return logits if inputs.rows else None  # a one-token prompt chunk that neither samples nor scores
        groups = self.compiled.batched if inputs.compiled else None
        hidden = self._hidden(inputs.ids, inputs.positions, inputs.batch, groups, between_layers)
        if not inputs.rows:
            return None
        # Under tensor parallelism every rank joins the vocabulary all-gather; rank 0 samples.
        return self.model.logits(hidden[inputs.rows])

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                compiled: list[LayerGroup] | None, between_layers: Callable[[], None] | None = None) -> torch.Tensor:
        """The step's hidden states: the embeddings, then the layers group after group (the compiled
        groups, or eagerly one layer at a time), calling `between_layers` between two groups. The
        same ops as the model's whole forward, so the same results."""
        x, cos, sin = self.model.embed_positions(ids, positions)
        for i, group in enumerate(self._eager if compiled is None else compiled):
            if i and between_layers is not None:
                between_layers()
            if compiled is not None and ids.shape[0] > 1:  # as _mark_dynamic: a graph's output has no marks
                for t in (x, cos, sin):
                    torch._dynamo.mark_dynamic(t, 0)
            x = group(x, cos, sin, batch, self.kv_caches)
        return x

    # --- the other ranks ------------------------------------------------------------------
    def run_worker(self) -> None:
        """Tensor-parallel ranks other than 0: run every step rank 0 broadcasts, on this rank's slice."""
        torch.set_grad_enabled(False)
        trimmed_at = time.monotonic()
        while (inputs := broadcast_step(None)) is not None:
            self._forward(inputs)
            if time.monotonic() - trimmed_at > TRIM_INTERVAL_S:
                release_free_memory()
                trimmed_at = time.monotonic()

    # --- step preparation -----------------------------------------------------------------
    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> tuple[StepInputs, list[Sequence], list[PrefillRows]]:
        """The step's inputs, the sequences that sample (in row order), and the prompt-logprob rows."""
        # Single-token rows first (attention batches them), then the prompt chunks (one by one).
        scheduled = sorted(scheduled, key=lambda s: s[1] > 1)
        compiled = self.compiled is not None and all(n == 1 for _, n in scheduled)
        ids, positions, batch, sample_rows = self._tensors(scheduled, compiled)
        samplers = [seq for (seq, _), row in zip(scheduled, sample_rows) if row is not None]
        prefill = self._prefill_rows(scheduled)
        rows = [r for r in sample_rows if r is not None] + [r for p in prefill for r in p.rows]
        return StepInputs(ids, positions, batch, rows, compiled), samplers, prefill

    def _prefill_rows(self, scheduled: list[tuple[Sequence, int]]) -> list[PrefillRows]:
        """Rows for sequences that asked for prompt logprobs and still miss some (a preempted
        sequence's are kept, not redone)."""
        out, start = [], 0
        for seq, n in scheduled:
            if seq.prefill is not None and len(seq.prefill) < seq.prompt_len:
                s = seq.num_computed
                first, end = max(s, len(seq.prefill) - 1), min(s + n, seq.prompt_len - 1)
                if first < end:
                    out.append(PrefillRows(seq, [start + p - s for p in range(first, end)], seq.token_ids[first + 1 : end + 1]))
            start += n
        return out

    def _context_slots(self, seqs: list[Sequence], length: int) -> torch.Tensor:
        """[len(seqs), length] cache slots of each sequence's first `length` positions (past a
        sequence's blocks: block 0, which no sequence owns)."""
        bs = self.block_size
        num = math.ceil(length / bs)
        table = torch.tensor([seq.blocks[:num] + [0] * (num - len(seq.blocks[:num])) for seq in seqs])
        return (table.unsqueeze(-1) * bs + torch.arange(bs)).view(len(seqs), -1)[:, :length]

    def _tensors(self, scheduled: list[tuple[Sequence, int]], compiled: bool):
        """Flatten the step's tokens; the context slots and masks of the single-token rows (padded
        to the longest context) and of each prompt chunk (its own context only)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int | None] = []
        for seq, n in scheduled:
            s = seq.num_computed
            ids.extend(seq.token_ids[s : s + n])
            positions.extend(range(s, s + n))
            slots.extend(seq.blocks[p // bs] * bs + p % bs for p in range(s, s + n))
            sample_rows.append(len(ids) - 1 if s + n == seq.num_tokens else None)
        singles = [seq for seq, n in scheduled if n == 1]
        kv_slots = mask = None
        if singles:
            ctx = torch.tensor([seq.num_computed + 1 for seq in singles])
            Lm = int(ctx.max())
            if compiled:
                Lm = -(-Lm // L_ALIGN) * L_ALIGN
            kv_slots = self._context_slots(singles, Lm)
            mask = (torch.arange(Lm) < ctx.unsqueeze(1)).unsqueeze(1)
        chunks, start = [], len(singles)
        for seq, n in scheduled[len(singles) :]:
            s = seq.num_computed
            if s == 0:
                chunks.append(PromptChunk(start, n))
            else:  # after a cached prefix or an earlier chunk: query i (position s + i) sees keys 0..s + i
                mask_c = torch.arange(s + n) <= (s + torch.arange(n)).unsqueeze(1)
                chunks.append(PromptChunk(start, n, self._context_slots([seq], s + n)[0], mask_c))
            start += n
        ids_t, pos_t = torch.tensor(ids), torch.tensor(positions)
        batch = AttentionBatch(torch.tensor(slots), kv_slots, mask, chunks)
        if self.device.type != "cpu":
            batch = batch.to(self.device)
            ids_t, pos_t = ids_t.to(self.device), pos_t.to(self.device)
        if compiled:  # on the tensors the graph gets: a copy to the device does not keep the marks
            self._mark_dynamic(batch)
        return ids_t, pos_t, batch, sample_rows
