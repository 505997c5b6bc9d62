"""The step loop: continuous batching over a paged KV cache.

One thread owns the model. Each step it (1) drops cancelled sequences and frees their blocks,
(2) schedules every running sequence plus as many waiting ones as the token budget, batch size
and free KV blocks allow (prompts may be split into chunks across steps), (3) runs one forward
for all scheduled tokens, (4) samples one token for each sequence whose prompt is complete, and
hands it to that request's callback. Requests join and leave the batch between steps.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

import torch

from shard.grammar import mask_logits
from shard.models.llama import AttentionBatch, LlamaModel
from shard.parallel import broadcast_step
from shard.sampler import Sampled, SamplingParams, sample

log = logging.getLogger("sluice.engine")

FINISH_LENGTH, FINISH_EOS = "length", "eos"
TRIM_INTERVAL_S = 10.0


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process already has loaded
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_malloc_trim = _libc_malloc_trim()


def release_free_memory() -> None:
    """Give freed heap pages back to the OS. Each step allocates tensors of new sizes (batch and
    context change all the time); glibc keeps what they freed inside its heap, fragmented, so the
    shard's resident memory crept up under varied load (+20% over a 3,000-request soak) though
    nothing leaked. malloc_trim takes a few ms; the engine calls it when idle and every
    TRIM_INTERVAL_S while busy."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class Draining(RuntimeError):
    """submit() after drain(): the shard is shutting down."""


class Sequence:
    """One request inside the engine. `on_event(kind, value)` is called from the engine thread:
    ("token", Sampled) (the last one has `finish` set) or ("error", message)."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        on_event: Callable[[str, object], None],
        stop_token_ids: frozenset[int] = frozenset(),
        top_n_tokens: int = 0,
        ignore_eos: bool = False,  # benchmarks: run to max_new_tokens whatever the model says
        matcher=None,  # an llguidance LLMatcher that every sampled token must satisfy
        prompt_logprobs: bool = False,
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        if params.do_sample and params.temperature <= 0:
            params.do_sample = False
        if params.do_sample and params.seed is None:
            params.seed = int.from_bytes(os.urandom(8), "little") >> 1
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed) if params.do_sample else None
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = stop_token_ids
        self.top_n_tokens = top_n_tokens
        self.ignore_eos = ignore_eos
        self.on_event = on_event
        self.matcher = matcher
        # Prompt token logprobs, filled chunk by chunk during prefill; the first token has none.
        self.prefill: list[float] | None = [math.nan] if prompt_logprobs else None
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.blocks: list[int] = []
        self.block_hashes: list[int] = []  # names of this sequence's full blocks, in order
        self.cancelled = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len


class BlockManager:
    """Fixed-size KV blocks with prefix reuse; a sequence's blocks need not be contiguous.

    A full block is named by a hash of every token up to its end, so two requests that share a
    prefix (a system prompt, a chat history) share its blocks instead of computing them again.
    Freed blocks keep their contents and name until they are handed out again, oldest first.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order
        self.refs = [0] * num_blocks
        self.block_hash: dict[int, int] = {}
        self.by_hash: dict[int, int] = {}
        self.hit_tokens = 0  # prompt tokens not computed thanks to reuse (a metric)

    def needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, math.ceil(num_tokens / self.block_size) - len(seq.blocks))

    def can_allocate(self, n: int) -> bool:
        return len(self.free_blocks) >= n

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.needed(seq, num_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            self.by_hash.pop(self.block_hash.pop(block, None), None)
            self.refs[block] = 1
            seq.blocks.append(block)

    def free(self, seq: Sequence) -> None:
        for block in seq.blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free_blocks[block] = None
        seq.blocks = []
        seq.block_hashes = []

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding this sequence's leading full blocks (at least one token stays
        to compute, so the step still yields logits for it)."""
        if seq.prefill is not None and len(seq.prefill) < seq.prompt_len:
            return []  # prompt logprobs need the logits of every prompt position: compute them all
        bs, found, parent = self.block_size, [], 0
        for i in range((seq.num_tokens - 1) // bs):
            parent = hash((parent, *seq.token_ids[i * bs : (i + 1) * bs]))
            block = self.by_hash.get(parent)
            if block is None:
                break
            found.append(block)
        return found

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        for block in blocks:
            if self.refs[block] == 0:
                del self.free_blocks[block]
            self.refs[block] += 1
        seq.blocks = list(blocks)
        seq.block_hashes = [self.block_hash[b] for b in blocks]
        seq.num_computed = len(blocks) * self.block_size
        self.hit_tokens += seq.num_computed

    def register_full(self, seq: Sequence) -> None:
        """Name the blocks that this step filled, so later requests can reuse them."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else 0
            h = hash((parent, *seq.token_ids[i * bs : (i + 1) * bs]))
            seq.block_hashes.append(h)
            block = seq.blocks[i]
            if h not in self.by_hash and block not in self.block_hash:
                self.by_hash[h], self.block_hash[block] = block, h


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_batch_prefill_tokens: int) -> None:
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def remove(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        # Out of KV blocks: drop the newest sequence's cache and recompute it later (its tokens
        # so far are kept, so the client sees no difference but a pause).
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of tokens to compute this step), running sequences first."""
        budget = self.max_batch_prefill_tokens
        out: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below for an earlier sequence
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0:
                continue
            need = self.blocks.needed(seq, seq.num_computed + n)
            while not self.blocks.can_allocate(need) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if not self.blocks.can_allocate(need):
                self._preempt(seq)
                continue
            self.blocks.allocate(seq, seq.num_computed + n)
            out.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            cached = self.blocks.cached_prefix(seq)
            start = len(cached) * self.blocks.block_size
            n = min(seq.num_tokens - start, budget)
            # Cached blocks that sit in the free list stop being free once this sequence takes them.
            idle = sum(1 for b in cached if self.blocks.refs[b] == 0)
            new = math.ceil((start + n) / self.blocks.block_size) - len(cached)
            if not self.blocks.can_allocate(new + idle):
                break
            self.waiting.popleft()
            self.blocks.take_prefix(seq, cached)
            self.blocks.allocate(seq, seq.num_computed + n)
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        return out


@dataclass
class EngineConfig:
    max_batch_total_tokens: int = 32768
    block_size: int = 16
    max_batch_size: int = 64
    max_batch_prefill_tokens: int = 512  # tokens per step: bounds how long a long prompt stalls decodes
    compile: bool = False  # decode-only steps through torch.compile (see compile_decode)


# Compiled decode steps pad the context to a multiple of this: the context length is a dynamic
# dimension of the graph, and padding keeps it clear of the sizes 0 and 1 that torch specializes.
L_ALIGN = 64


def allocate_kv_caches(model: LlamaModel, config: EngineConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # One K and one V tensor per layer (not one big tensor): writes stay in place. Each
    # tensor-parallel rank holds only its own KV heads. zero_() writes every page now: a lazily
    # mapped cache would grow the process's resident memory block by block under load, up to the
    # whole cache, and an out-of-memory would come late instead of at start-up.
    cfg, w = model.cfg, model.embed_tokens
    num_blocks = config.max_batch_total_tokens // config.block_size
    shape = (num_blocks * config.block_size, model.tp.kv_heads_per_rank(cfg.num_kv_heads), cfg.head_dim)
    return [(torch.empty(shape, dtype=w.dtype, device=w.device).zero_(),
             torch.empty(shape, dtype=w.dtype, device=w.device).zero_()) for _ in range(cfg.num_layers)]


def run_worker(model: LlamaModel, config: EngineConfig) -> None:
    """Tensor-parallel ranks other than 0: run every step rank 0 broadcasts, on this rank's slice."""
    kv_caches = allocate_kv_caches(model, config)
    torch.set_grad_enabled(False)
    trimmed_at = time.monotonic()
    while (step := broadcast_step(None)) is not None:
        ids, positions, batch, rows = step
        hidden = model(ids, positions, batch, kv_caches)
        if rows:
            model.logits(hidden[rows])  # joins the vocabulary all-gather; rank 0 samples
        if time.monotonic() - trimmed_at > TRIM_INTERVAL_S:
            release_free_memory()
            trimmed_at = time.monotonic()


def compile_decode(model: LlamaModel) -> Callable:
    """torch.compile of the model for decode-only steps. Eager, each step pays a fixed ~8-15 ms
    of Python and ATen dispatch over ~700 small ops; the compiled graph fuses them. Two graphs:
    batch 1, and every batch of 2 or more (a dynamic dimension, measured as fast as one graph per
    padded batch size, and compiled once instead of seven times). See Engine.warm_up."""
    if model.tp.size > 1:
        raise ValueError("--compile supports --num-shard 1 only: the tensor-parallel all_reduce is not traced")
    import torch._dynamo  # noqa: F401  (Engine._mark_dynamic)
    import torch._inductor.config

    # Freezing makes the weights constants that inductor packs once for oneDNN's matmuls: 1.2x
    # over eager without it, 1.6x with it (SmolLM2 bf16, batch 1-4). It must be set globally:
    # torch.compile(options={"freezing": True}) was silently ignored (torch 2.13).
    torch._inductor.config.freezing = True
    return torch.compile(model.hidden_states, dynamic=False)


class Engine:
    def __init__(self, model: LlamaModel, config: EngineConfig, eos_token_ids: list[int]) -> None:
        self.model = model
        self.config = config
        self.eos = frozenset(eos_token_ids)
        self.device = model.embed_tokens.device
        num_blocks = config.max_batch_total_tokens // config.block_size
        self.kv_caches = allocate_kv_caches(model, config)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_batch_size, config.max_batch_prefill_tokens)
        self.max_seq_len = min(model.cfg.max_position_embeddings, num_blocks * config.block_size)
        self._inbox: deque[Sequence] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0
        self.failed: str | None = None  # set when the tensor-parallel group broke: the shard is unhealthy
        self._trimmed_at, self._trimmed_step = time.monotonic(), 0
        self.on_fatal: Callable[[str], None] | None = None
        self.drain_deadline: float | None = None
        self._compiled: Callable | None = None
        if config.compile:
            self._compiled = compile_decode(model)

    def warm_up(self) -> None:
        """Compile both decode graphs now, before the first request (tens of seconds each on a
        small CPU): compiled lazily, the first request of each kind would stall every stream in its
        batch that long. Dummy rows write their K/V into slot 0, which no sequence holds yet (and
        any sequence given it later writes before it reads)."""
        if self._compiled is None:
            return

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=self.device)

        t0 = time.monotonic()
        with torch.inference_mode():
            for batch_size in (1, 2):
                # Shaped like _prepare's tensors (distinct, contiguous): else the guards differ.
                mask = (torch.arange(L_ALIGN, device=self.device) == 0).repeat(batch_size, 1, 1)
                batch = AttentionBatch(zeros(batch_size), zeros(batch_size, L_ALIGN), mask, None, None)
                ids, positions = zeros(batch_size), zeros(batch_size)
                self._mark_dynamic(ids, positions, batch)
                self._compiled(ids, positions, batch, self.kv_caches)
        log.info("compiled the decode graphs in %.1fs", time.monotonic() - t0)

    @staticmethod
    def _mark_dynamic(ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> None:
        torch._dynamo.mark_dynamic(batch.kv_slots, 1)
        torch._dynamo.mark_dynamic(batch.mask, 2)
        if ids.shape[0] > 1:  # batch 1 keeps a graph of its own (torch specializes size 1 anyway)
            for t in (ids, positions, batch.slot_mapping, batch.kv_slots, batch.mask):
                torch._dynamo.mark_dynamic(t, 0)

    # --- called from other threads -------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        if self.drain_deadline is not None:
            raise Draining("the shard is shutting down and takes no new requests")
        if not seq.token_ids:
            raise ValueError("empty prompt")
        if seq.num_tokens >= self.max_seq_len:
            raise ValueError(f"prompt of {seq.num_tokens} tokens leaves no room: the limit is {self.max_seq_len}")
        self._inbox.append(seq)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._wake.set()

    def start(self) -> None:
        """Run the loop in a thread of its own (tests). The shard runs it in its main thread
        instead (`run`): OpenMP's spinning worker pool belongs to the main thread, and the same
        step takes ~30% longer when issued from any other thread (measured, SmolLM2 batch 1)."""
        self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._running and self.failed is None and self.drain_deadline is None

    def drain(self, timeout_s: float) -> None:
        """Take no new requests, let those in flight finish for up to `timeout_s`, fail the rest, stop."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + timeout_s
            log.info("draining %d request(s) in flight, for up to %.0f s", sum(self.stats()[:2]), timeout_s)
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def fail_all(self, message: str) -> None:
        """Give every in-flight request an error (used when a tensor-parallel rank died)."""
        self.failed = message
        self._fail_in_flight(message)

    def _fail_in_flight(self, message: str) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting, *self._inbox]:
            seq.on_event("error", message)

    def stats(self) -> tuple[int, int, int]:
        """(running, waiting, free KV blocks), read without locks: a snapshot for /health."""
        return len(self.scheduler.running), len(self.scheduler.waiting) + len(self._inbox), len(self.blocks.free_blocks)

    # --- the engine thread ---------------------------------------------------------------
    def run(self) -> None:
        """The step loop; returns after `stop()`."""
        torch.set_grad_enabled(False)
        self._running = True
        try:
            self._loop()
        finally:
            self._running = False

    def _loop(self) -> None:
        while not self._stop:
            while self._inbox:
                self.scheduler.waiting.append(self._inbox.popleft())
            for seq in [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.cancelled]:
                self.scheduler.remove(seq)
            idle = not self.scheduler.running and not self.scheduler.waiting
            if self.drain_deadline is not None and (idle or time.monotonic() >= self.drain_deadline):
                if not idle:
                    log.warning("shutdown timeout: failing %d request(s) still in flight", sum(self.stats()[:2]))
                    self._fail_in_flight("the shard is shutting down: generation stopped at its shutdown timeout")
                return
            if self.steps != self._trimmed_step and (idle or time.monotonic() - self._trimmed_at > TRIM_INTERVAL_S):
                release_free_memory()
                self._trimmed_at, self._trimmed_step = time.monotonic(), self.steps
            if idle:
                self._wake.wait(timeout=1.0)  # a timeout keeps signal handlers prompt in the main thread
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # a failed step fails its batch, never the process
                log.exception("engine step failed")
                if self.model.tp.size > 1:
                    # The ranks may now disagree about the step they are in: the group is broken.
                    self.fail_all(f"tensor-parallel step failed: {exc}")
                    if self.on_fatal:
                        self.on_fatal(str(exc))
                    return
                for seq in list(self.scheduler.running):
                    self.scheduler.remove(seq)
                    seq.on_event("error", f"{type(exc).__name__}: {exc}")

    @torch.inference_mode()  # the logits are inference tensors: masks and penalties edit them in place
    def step(self) -> None:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            time.sleep(0.001)  # nothing fits yet (KV full of waiting prompts): let cancels land
            return
        ids, positions, batch, sample_rows = self._prepare(scheduled)
        rows = [r for r in sample_rows if r is not None]
        prefill = self._prefill_rows(scheduled)
        all_rows = rows + [r for _, rs, _ in prefill for r in rs]
        if self.model.tp.size > 1:
            broadcast_step((ids, positions, batch, all_rows))
        forward = self._compiled if self._compiled is not None and batch.q_index is None else self.model
        hidden = forward(ids, positions, batch, self.kv_caches)
        samplers = [seq for (seq, n), row in zip(scheduled, sample_rows) if row is not None]
        results: list[Sampled] = []
        if all_rows:
            all_logits = self.model.logits(hidden[all_rows]).cpu()
            logits = all_logits[: len(rows)]
        if prefill:
            logprobs = torch.log_softmax(all_logits[len(rows):], dim=-1)
            at = 0
            for seq, rs, targets in prefill:
                seq.prefill.extend(logprobs[at : at + len(rs)].gather(1, torch.tensor(targets).unsqueeze(1))[:, 0].tolist())
                at += len(rs)
        if samplers:
            constrained = [j for j, s in enumerate(samplers) if s.matcher is not None]
            if constrained:
                sub = logits[constrained]
                mask_logits(sub, [samplers[j].matcher for j in constrained])
                logits[constrained] = sub
            results = sample(
                logits,
                [s.params for s in samplers],
                [s.generator for s in samplers],
                [torch.tensor(s.token_ids) for s in samplers],
                [s.top_n_tokens for s in samplers],
            )
        for seq, n in scheduled:
            seq.num_computed += n
            self.blocks.register_full(seq)
        for seq, res in zip(samplers, results):
            self._append(seq, res)
        self.steps += 1

    def _prefill_rows(self, scheduled: list[tuple[Sequence, int]]) -> list[tuple[Sequence, list[int], list[int]]]:
        """(sequence, rows of this step's hidden states, the prompt token each row predicts) for sequences
        that asked for prompt logprobs and still miss some (a preempted sequence's are kept, not redone)."""
        out, start = [], 0
        for seq, n in scheduled:
            if seq.prefill is not None and len(seq.prefill) < seq.prompt_len:
                s = seq.num_computed
                first, end = max(s, len(seq.prefill) - 1), min(s + n, seq.prompt_len - 1)
                if first < end:
                    out.append((seq, [start + p - s for p in range(first, end)], seq.token_ids[first + 1 : end + 1]))
            start += n
        return out

    def _append(self, seq: Sequence, res: Sampled) -> None:
        seq.token_ids.append(res.token_id)
        # A grammar that is complete (or, defensively, broken) ends the sequence like an eos would.
        grammar_done = seq.matcher is not None and (not seq.matcher.consume_token(res.token_id)
                                                    or seq.matcher.is_stopped())
        if grammar_done or res.token_id in seq.stop_token_ids or (res.token_id in self.eos and not seq.ignore_eos):
            res.finish = FINISH_EOS
        elif seq.num_generated >= seq.max_new_tokens or seq.num_tokens >= self.max_seq_len:
            res.finish = FINISH_LENGTH
        if res.finish:
            self.scheduler.remove(seq)
        seq.on_event("token", res)  # the last token carries its finish reason: one message, not two

    def _prepare(self, scheduled: list[tuple[Sequence, int]]):
        """Flatten the step's tokens and build the attention gather/mask for the whole batch."""
        bs = self.blocks.block_size
        ids: list[int] = []
        positions: list[int] = []
        starts, lens, ctx = [], [], []
        sample_rows: list[int | None] = []
        for seq, n in scheduled:
            s = seq.num_computed
            starts.append(len(ids))
            ids.extend(seq.token_ids[s : s + n])
            positions.extend(range(s, s + n))
            lens.append(n)
            ctx.append(s + n)
            sample_rows.append(len(ids) - 1 if s + n == seq.num_tokens else None)
        B, Qm, Lm = len(scheduled), max(lens), max(ctx)
        compiled = self._compiled is not None and Qm == 1
        if compiled:
            Lm = -(-Lm // L_ALIGN) * L_ALIGN
        max_blocks = math.ceil(Lm / bs)
        table = torch.tensor([seq.blocks[:max_blocks] + [0] * (max_blocks - len(seq.blocks[:max_blocks])) for seq, _ in scheduled])
        kv_slots = (table.unsqueeze(-1) * bs + torch.arange(bs)).view(B, -1)[:, :Lm]
        pos_t = torch.tensor(positions)
        block_of = torch.tensor([seq.blocks[p // bs] for (seq, n) in scheduled for p in range(seq.num_computed, seq.num_computed + n)])
        slot_mapping = block_of * bs + pos_t % bs
        keys = torch.arange(Lm)
        if Qm == 1:
            mask = (keys < torch.tensor(ctx).unsqueeze(1)).unsqueeze(1)
            q_index = q_valid = None
        else:
            qi = torch.arange(Qm)
            lens_t, starts_t = torch.tensor(lens).unsqueeze(1), torch.tensor(starts).unsqueeze(1)
            q_valid = qi < lens_t
            q_index = torch.where(q_valid, starts_t + qi, 0)
            q_pos = torch.tensor([seq.num_computed for seq, _ in scheduled]).unsqueeze(1) + qi  # [B, Qm]
            mask = keys.view(1, 1, Lm) <= q_pos.unsqueeze(-1)
        ids_t = torch.tensor(ids)
        batch = AttentionBatch(slot_mapping, kv_slots, mask, q_index, q_valid)
        if self.device.type != "cpu":
            batch = AttentionBatch(*(None if t is None else t.to(self.device, non_blocking=True) for t in vars(batch).values()))
            ids_t, pos_t = ids_t.to(self.device), pos_t.to(self.device)
        if compiled:  # on the tensors the graph gets: a copy to the device does not keep the marks
            self._mark_dynamic(ids_t, pos_t, batch)
        return ids_t, pos_t, batch, sample_rows
