"""The scheduler: one worker thread runs the model for every request, with continuous batching.

Between two decode steps the worker drops the rows of abandoned requests, prefills waiting requests
and adds them to the running batch (``Batch``), then advances every row by one token. Each request
samples with its own settings and random generator and is decoded to text by its own ``StreamDecoder``;
results go back through the request's ``sink`` callable (called on the worker thread).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qwenlm.allocator import release_freed_memory
from qwenlm.chat.stream import StreamDecoder
from qwenlm.generation.processors import Temperature
from qwenlm.quant.cpu_kernel import argmax
from qwenlm.serve.batch import Batch

log = logging.getLogger("qwenlm.serve")
# How often the worker hands freed heap memory back to the system. Every step allocates tensors whose sizes
# change with the batch (logits are rows x vocabulary), and glibc keeps the freed heap (all the more with
# allocator.keep_freed_memory): a soak run's resident memory crept up by ~40 MiB a minute without trimming,
# all of it given back by a trim.
TRIM_EVERY_S = 10.0
PREFILL_TOKENS = 4096  # requests joining together are prefilled in groups of at most this many padded tokens


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Finished | Failed


class QueueFull(Exception):
    """Too many requests are waiting for a batch slot."""


@dataclass(eq=False)
class Job:
    """One request inside the engine."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    decoder: StreamDecoder
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.perf_counter)

    def sample(self, scores: torch.Tensor) -> int:
        """The next id from this request's scores (1, V)."""
        if self.generator is None:
            return int(argmax(scores)[0])
        if self.params.temperature != 1.0:
            scores = Temperature(self.params.temperature)(None, scores)
        return sample_top_p(scores[0].softmax(dim=-1), self.params.top_p, self.generator)


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator) -> int:
    """Draw from the nucleus of ``probs`` (V,): the tokens HF's top-p keeps (each one whose more likely
    tokens hold less than ``top_p`` of the mass), renormalised.

    Same distribution as ``processors.TopP`` + ``torch.multinomial``, but per row and step that pair sorts
    the whole vocabulary and costs ~70 ms on a CPU; here only a top-k that holds the nucleus is sorted,
    and the draw is an inverse-CDF lookup.
    """
    if top_p >= 1.0:
        cdf = probs.float().cumsum(0)
        draw = torch.rand((), generator=generator, device=probs.device) * cdf[-1]
        return int(torch.searchsorted(cdf, draw.reshape(1)).clamp(max=probs.numel() - 1))
    k = min(64, probs.numel())
    while True:
        top, ids = probs.topk(k)  # sorted, largest first
        if float(top.sum()) >= top_p or k == probs.numel():
            break
        k = min(k * 8, probs.numel())
    before = top.double().cumsum(0) - top.double()  # mass of the more likely tokens
    kept = top.double()[before < top_p]
    cdf = kept.cumsum(0)
    draw = torch.rand((), generator=generator, device=probs.device, dtype=torch.float64) * cdf[-1]
    return int(ids[int(torch.searchsorted(cdf, draw.reshape(1)).clamp(max=kept.numel() - 1))])


class Engine:
    """Continuous batching over a model; ``submit`` from any thread, results arrive through sinks."""

    def __init__(self, model, tokenizer, stop_ids: Sequence[int], max_batch: int = 16, max_queue: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = model.config.max_position_embeddings
        self.vocab_size = len(tokenizer)
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._wake = threading.Condition()
        self._closed = False
        self._batch = Batch(model)
        self._thread = threading.Thread(target=self._run, name="qwenlm-engine", daemon=True)
        self.steps = 0  # decode steps run, for monitoring
        self._trimmed = time.monotonic()

    # -- any thread ---------------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[Event], None]) -> Job:
        """Queue a request. ValueError if the prompt leaves no room in the context; ``QueueFull`` if too
        many requests wait already."""
        prompt = [int(i) for i in prompt]
        if not prompt:
            raise ValueError("the prompt is empty: generation needs at least one token")
        room = self.context - len(prompt)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens but the model's context is {self.context} tokens; shorten it"
            )
        params = SamplingParams(min(params.max_tokens, room), params.temperature, params.top_p, params.seed,
                                tuple(params.stop))  # fmt: skip
        decoder = StreamDecoder(self.tokenizer, stop_strings=params.stop, stop_ids=self.stop_ids)
        job = Job(prompt, params, sink, decoder)
        if params.temperature > 0:
            job.generator = torch.Generator(device=self.model.device)
            if params.seed is None:
                job.generator.seed()
            else:
                job.generator.manual_seed(params.seed)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            free_slots = max(0, self.max_batch - len(self._active))
            if len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Abandon ``job`` (its client left): a waiting job leaves the queue now, a running one's row is
        freed before the next step. Harmless for a finished job."""
        with self._wake:
            job.cancelled = True
            with contextlib.suppress(ValueError):  # not waiting (any more)
                self._waiting.remove(job)
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        with self._wake:
            return {"running": len(self._active), "waiting": len(self._waiting), "max_batch": self.max_batch,
                    "batch_width": self._batch.width, "steps": self.steps}  # fmt: skip

    # -- the worker thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and not self._active:
                        self._wake.wait()
                    if self._closed:
                        break
                    joining = []
                    while self._waiting and len(self._active) + len(joining) < self.max_batch:
                        joining.append(self._waiting.popleft())
                try:
                    self._drop_cancelled()
                    if joining:
                        self._admit(joining)
                    if self._active:
                        self._step()
                    if time.monotonic() - self._trimmed > TRIM_EVERY_S:
                        release_freed_memory()
                        self._trimmed = time.monotonic()
                except Exception as e:  # a model failure must not kill the server: fail these requests
                    log.exception("decode step failed")
                    for job in self._active:
                        self._emit(job, Failed(f"generation failed: {e}"))
                    with self._wake:
                        self._active = []
                    self._batch = Batch(self.model)
        for job in [*self._active, *self._waiting]:
            self._emit(job, Failed("the server is shutting down"))

    def _drop_cancelled(self) -> None:
        # One snapshot of the flags: a client may cancel while the rows are being removed, and the batch
        # and the job list must lose the same rows (that job's row goes at the next step).
        gone = {i for i, job in enumerate(self._active) if job.cancelled}
        if gone:
            self._batch.remove(sorted(gone))
            with self._wake:
                self._active = [job for i, job in enumerate(self._active) if i not in gone]

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the joining requests in groups of similar length, sample their first tokens, and add
        the rows that go on to the batch."""
        jobs = sorted((job for job in jobs if not job.cancelled), key=lambda job: len(job.prompt))
        while jobs:
            group = [jobs.pop()]  # the longest left, then shorter ones while the padded group stays small
            while jobs and (len(group) + 1) * len(group[0].prompt) <= PREFILL_TOKENS:
                group.append(jobs.pop())
            try:
                logits, cache, mask = self._batch.prefill([job.prompt for job in group])
            except Exception as e:
                log.exception("prefill failed")
                for job in group:
                    self._emit(job, Failed(f"generation failed: {e}"))
                continue
            logits = logits.float()
            keep = [i for i, job in enumerate(group) if self._accept(job, job.sample(logits[i : i + 1]))]
            self._batch.join(cache, mask, keep)
            with self._wake:
                self._active += [group[i] for i in keep]

    def _step(self) -> None:
        logits = self._batch.step([job.generated[-1] for job in self._active]).float()  # (B, V)
        self.steps += 1
        greedy = argmax(logits).tolist()
        done = []
        for i, job in enumerate(self._active):
            token = greedy[i] if job.generator is None else job.sample(logits[i : i + 1])
            if not self._accept(job, token):
                done.append(i)
        if done:
            self._batch.remove(done)
            gone = set(done)
            with self._wake:
                self._active = [job for i, job in enumerate(self._active) if i not in gone]

    def _accept(self, job: Job, token: int) -> bool:
        """Record ``token`` for ``job`` and send its text; False when the job is finished."""
        job.generated.append(token)
        # The embedding has more rows than the tokenizer has ids; such an id (only an untrained or random
        # model picks one) has no text.
        text = job.decoder.push(token) if token < self.vocab_size else ""
        reason = None
        if job.decoder.stopped:
            reason = "stop"
        elif len(job.generated) >= job.params.max_tokens:
            reason = "length"
            text += job.decoder.finish()
        if text:
            self._emit(job, Delta(text))
        if reason is None and not job.cancelled:
            return True
        if reason is not None:
            self._emit(job, Finished(reason, len(job.prompt), len(job.generated)))
        return False

    @staticmethod
    def _emit(job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # the receiver is gone (its event loop closed): nothing to tell
            log.debug("dropped an event for a finished request", exc_info=True)
