"""The step loop: continuous batching over a paged KV cache.

One thread owns the model. Each step it (1) drops cancelled sequences and frees their blocks,
(2) schedules every running sequence plus as many waiting ones as the token budget, batch size
and free KV blocks allow (prompts may be split into chunks across steps), (3) runs one forward
for all scheduled tokens, (4) samples one token for each sequence whose prompt is complete, and
hands it to that request's callback. Requests join and leave the batch between steps, with one
exception: a light tenant's request (Scheduler._newcomers), arriving during a step, may run its prompt in
a step of its own between two of that step's layers (`_between_layers`, Scheduler.interject), so that
its first token waits for part of the step in progress instead of all of it.

The parts: Sequence (shard/sequence.py), BlockManager (shard/block_manager.py), Scheduler
(shard/scheduler.py), ModelRunner (shard/model_runner.py: tensors, forward, tensor parallelism).
This file is the loop and its rules: admission, sampling, when a sequence finishes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from shard.block_manager import BlockManager
from shard.grammar import mask_logits
from shard.memory import TRIM_INTERVAL_S, release_free_memory
from shard.model_runner import ModelRunner
from shard.models.llama import LlamaModel
from shard.rates import StepRates
from shard.sampler import Sampled, sample
from shard.scheduler import Scheduler
from shard.sequence import FINISH_EOS, FINISH_LENGTH, Sequence

log = logging.getLogger("sluice.engine")


class Draining(RuntimeError):
    """submit() after drain(): the shard is shutting down."""


@dataclass
class EngineConfig:
    max_batch_total_tokens: int = 32768
    block_size: int = 16
    max_batch_size: int = 64
    max_batch_prefill_tokens: int = 512  # tokens per step: bounds how long a long prompt stalls decodes
    compile: bool = False  # decode-only steps through torch.compile (see model_runner.compile_decode)
    compile_in_background: bool = False  # serve eagerly while the graphs compile, then switch to them

    @property
    def num_blocks(self) -> int:
        return self.max_batch_total_tokens // self.block_size


class Engine:
    def __init__(self, model: LlamaModel, config: EngineConfig, eos_token_ids: list[int]) -> None:
        self.model = model
        self.config = config
        self.eos = frozenset(eos_token_ids)
        self.runner = ModelRunner(model, config.num_blocks, config.block_size, config.compile)
        self.device = self.runner.device
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_batch_size, config.max_batch_prefill_tokens)
        self.max_seq_len = min(model.cfg.max_position_embeddings, self.blocks.num_blocks * config.block_size)
        self._inbox: deque[Sequence] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0
        self.rates = StepRates()
        self.failed: str | None = None  # set when the tensor-parallel group broke: the shard is unhealthy
        self._trimmed_at, self._trimmed_step = time.monotonic(), 0
        self.on_fatal: Callable[[str], None] | None = None
        self.drain_deadline: float | None = None
        self.compile_thread: threading.Thread | None = None  # compiling in the background, if so
        self._interjected = False  # whether the step in progress has let newcomers in (_between_layers)

    def warm_up(self) -> None:
        """Compile the decode graphs (see ModelRunner.warm_up): now, before the first request, or in a
        thread of their own while the engine serves eagerly (`compile_in_background`): a shard is
        healthy in seconds instead of minutes, and reaches full speed without a restart."""
        if self.config.compile_in_background:
            self.compile_thread = threading.Thread(target=self.runner.warm_up, kwargs={"background": True},
                                                   name="compile", daemon=True)
            self.compile_thread.start()
        else:
            self.runner.warm_up()

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

    @property
    def stopping(self) -> bool:
        """stop() was called: the loop ends (or has ended)."""
        return self._stop

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
        return len(self.scheduler.running), len(self.scheduler.waiting) + len(self._inbox), self.blocks.num_free

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
            self._take_inbox()
            self._drop_cancelled([*self.scheduler.running, *self.scheduler.waiting])
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

    def _take_inbox(self) -> None:
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())

    def _drop_cancelled(self, seqs: list[Sequence]) -> None:
        for seq in [s for s in seqs if s.cancelled]:
            self.scheduler.remove(seq)

    @torch.inference_mode()  # the logits are inference tensors: masks and penalties edit them in place
    def step(self) -> None:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            time.sleep(0.001)  # nothing fits yet (KV full of waiting prompts): let cancels land
            return
        self._interjected = False
        # Under tensor parallelism the other ranks run each step in lockstep with this one: a step of
        # rank 0's own between two layers would leave them waiting in a collective, so none runs.
        self._run(scheduled, self._between_layers if self.model.tp.size == 1 else None)

    def _between_layers(self) -> None:
        """Between two layer groups of a step: if requests arrived, and the scheduler admits some as
        urgent newcomers (Scheduler.interject), run their prompts now in a step of their own, which
        sends their first tokens; then the step in progress goes on with its remaining layers. At
        most once per step: each interjection delays the step's own tokens by a prompt step, and
        newcomers arriving one after another must not hold a decode step back indefinitely."""
        if self._interjected or not self._inbox:  # between every two layers of an eager step: cheap checks first
            return
        self._take_inbox()
        self._drop_cancelled(self.scheduler.waiting)  # waiting ones only: the running ones' blocks are being written
        scheduled = self.scheduler.interject()
        if scheduled:
            self._interjected = True
            self._run(scheduled)

    def _run(self, scheduled: list[tuple[Sequence, int]], between_layers: Callable[[], None] | None = None) -> None:
        """One step: the forward, then sampling, and the bookkeeping. The time observed for a step
        includes that of a step interjected into it: its own sequences did wait for it."""
        started = time.perf_counter()
        prefill_tokens = sum(n for seq, n in scheduled if seq.num_computed + n < seq.num_tokens or n > 1)
        samplers, logits = self.runner.step(scheduled, between_layers)
        results = self._sample(samplers, logits) if samplers else []
        self.scheduler.advance(scheduled)
        for seq, res in zip(samplers, results):
            self._append(seq, res)
        self.steps += 1
        self.rates.observe(prefill_tokens, time.perf_counter() - started)

    @staticmethod
    def _sample(samplers: list[Sequence], logits: torch.Tensor) -> list[Sampled]:
        """One token per sampling sequence: grammar masks first, then penalties and sampling."""
        constrained = [j for j, s in enumerate(samplers) if s.matcher is not None]
        if constrained:
            sub = logits[constrained]
            mask_logits(sub, [samplers[j].matcher for j in constrained])
            logits[constrained] = sub
        return sample(
            logits,
            [s.params for s in samplers],
            [s.generator for s in samplers],
            # Built only for the penalties: every sequence's whole history, every step, took ~1.3 ms at batch 16.
            [torch.tensor(s.token_ids) if s.params.uses_history else None for s in samplers],
            [s.top_n_tokens for s in samplers],
        )

    def _append(self, seq: Sequence, res: Sampled) -> None:
        """Add the sampled token, decide whether it ends the sequence, and hand it on."""
        seq.token_ids.append(res.token_id)
        # A grammar that is complete (or, defensively, broken) ends the sequence like an eos would.
        grammar_done = seq.matcher is not None and (not seq.matcher.consume_token(res.token_id)
                                                    or seq.matcher.is_stopped())
        if grammar_done or seq.finishes_on(res.token_id, self.eos):
            res.finish = FINISH_EOS
        elif seq.num_generated >= seq.max_new_tokens or seq.num_tokens >= self.max_seq_len:
            res.finish = FINISH_LENGTH
        if res.finish:
            self.scheduler.remove(seq)
        seq.on_event("token", res)  # the last token carries its finish reason: one message, not two
