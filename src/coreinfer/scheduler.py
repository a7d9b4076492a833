"""Continuous batching: concurrent requests share the lean backend's decode steps.

Decoding a small model at batch 1 is bound by reading the weights once per token, and a step for
several sequences reads them once too. So the server does not queue whole requests behind each
other; like llama.cpp's slots and vLLM, a ``Scheduler`` thread runs one loop:

1. admit the oldest waiting request if the batch has room: prefill it (densely, with its own
   sparse session, exactly as ``decode.loop.generate`` does) and take its first token;
2. step every ``Lane`` once: one batched ``LeanBackend.step`` for all its sequences;
3. hand each sequence its token (sampling, stop strings and streaming per request), and drop
   the sequences that finished or whose client went away.

A request joins at a step boundary, after its own prefill: one prefill runs between two steps,
so a newcomer stalls the others for one prompt's prefill at most, and on the int4 lean
prefill for one chunk of it at a time (``lean.prefill_steps``). Sequences that decode alike
share a lane: dense ones, sentence-level ones (each row with its own compact weights), and
token-level ones at the same thresholds. Each lane keeps one KV cache whose rows are aligned on
their last token, like a left-padded batch, so the lean step's attention, masks and sliding
windows apply unchanged.

Requests the lean backend cannot batch (the reference backend, sentence-level ``keep="auto"``,
which re-prefills after its warm-up) run whole, one at a time, through ``Engine.generate_ids``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .config import SamplingConfig, SparsityConfig
from .decode.lean import CompactLayer, KVCache, LeanBackend, LeanState, PromptCache
from .decode.loop import GenerationResult, TokenEvent, _Sequence, _Tracker, pick_tokens, results_for
from .process_memory import release_free_memory

MIN_PREFIX = 16  # shared tokens below which a kept prefix is not worth its lookup and copy
PREFIX_BYTES = 64 * 2**20  # keys and values kept per backend (SmolLM2: ~45 KB a token, ~1,400 tokens)


def check_limits(max_batch: int, max_queue: int, queue_timeout: float) -> None:
    """The scheduler's limits, as ``Scheduler`` and the server's settings take them."""
    if max_batch < 1 or max_queue < 0 or queue_timeout <= 0:
        raise ValueError("max_batch must be at least 1, max_queue at least 0 and queue_timeout positive; got "
                         f"{max_batch}, {max_queue} and {queue_timeout}")


class QueueFull(Exception):
    """More requests are waiting than the server queues; ``retry_after`` seconds is a fair wait."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are waiting already; retry in {retry_after} s")
        self.retry_after = retry_after


class QueueTimeout(Exception):
    """A request waited longer than the server allows for a free slot."""


class Cancelled(Exception):
    """The request was cancelled (its client went away) before it finished."""


@dataclass
class Submission:
    """One batch of prompts sharing sparsity and sampling, as the scheduler runs it.

    ``results`` (one per prompt) or ``error`` is set when ``done`` is.
    """

    prompts: list[list[int]]
    sparsity: Optional[SparsityConfig]
    sampling: SamplingConfig
    on_token: Optional[Callable[[TokenEvent], None]] = None
    submitted: float = field(default_factory=time.monotonic)
    admitted: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    on_done: Optional[Callable[[], None]] = None  # called once, from the scheduler's side, when done is set
    on_admitted: Optional[Callable[[], None]] = None  # called from the scheduler's side when admitted is set
    results: Optional[list[GenerationResult]] = None
    error: Optional[BaseException] = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop at the next step and free the slots (a client that disconnected)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait(self, timeout: Optional[float] = None) -> list[GenerationResult]:
        if not self.done.wait(timeout):
            raise TimeoutError("the request has not finished")
        if self.error is not None:
            raise self.error
        return self.results

    def admit(self) -> None:
        """It has left the queue (to decode, or settled there)."""
        if not self.admitted.is_set():
            self.admitted.set()
            if self.on_admitted is not None:
                self.on_admitted()

    def complete(self, results: list[GenerationResult]) -> None:
        self._settle(results, None)

    def fail(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, results, error) -> None:
        if self.done.is_set():
            return
        self.results, self.error = results, error
        self.admit()
        self.done.set()
        if self.on_done is not None:
            self.on_done()


class _Running:
    """A submission's decoding state once admitted: its sequences, session and timings."""

    def __init__(self, sub: Submission, engine, backend: LeanBackend, sparsity, session, seqs, tracker):
        self.sub, self.engine, self.backend, self.sparsity, self.session = sub, engine, backend, sparsity, session
        self.seqs, self.tracker = seqs, tracker
        self.prefill_s = self.select_s = 0.0
        self.decode_start = time.perf_counter()

    def advance(self, tokens: dict[int, int]) -> bool:
        """Record the tokens of the sequences that decoded this step; whether all have finished."""
        try:
            return self.tracker.advance([tokens.get(i, 0) for i in range(len(self.seqs))])
        except Exception as err:  # the streaming callback refused the token: its client has gone
            self.sub.cancel()
            self.sub.fail(Cancelled(str(err) or "cancelled"))
            return True

    def finish(self) -> None:
        if self.sub.done.is_set():
            return
        self.tracker.finish()
        decode_s = time.perf_counter() - self.decode_start
        keep = self.sparsity.keep if self.sparsity is not None else None
        self.sub.complete(results_for(self.engine, self.backend, self.seqs, self.session, self.prefill_s,
                                      self.select_s, decode_s, keep))


@dataclass
class _Row:
    """One sequence of a lane: which running request and which of its sequences, and what it feeds next."""

    request: _Running
    index: int
    next_token: int


class _RowCounts:
    """A lane's token-level counting, routed to each row's own ``TokenSession``.

    The lean step counts per row of its batch (``TokenSession.count``); a lane's rows belong to
    different requests, each with its own session of its own batch size.
    """

    def __init__(self, rows: Sequence[_Row]):
        self.owners: dict[int, tuple[object, list[tuple[int, int]]]] = {}
        for lane_row, row in enumerate(rows):
            session = row.request.session
            self.owners.setdefault(id(session), (session, []))[1].append((lane_row, row.index))

    def count(self, layer: int, group: int, kept: Sequence[int], tokens=None) -> None:
        for session, pairs in self.owners.values():
            own = [0] * session.batch_size
            for lane_row, index in pairs:
                own[index] = kept[lane_row]
            session.count(layer, group, own)

    def count_tokens(self, batch: int) -> None:
        for session, pairs in self.owners.values():
            for _, index in pairs:
                session.tokens[index] += 1


class Lane:
    """Sequences that decode alike, in one KV cache of ``rows`` x ``capacity`` slots.

    Every member's latest token sits at slot ``state.slot - 1``: a sequence joining with a prompt
    of ``W`` columns fills slots ``[slot - W, slot)`` of its row, the rest of the row stays masked.
    """

    def __init__(self, backend: LeanBackend, kind: str):
        self.backend, self.kind = backend, kind
        self.model = backend.model
        self.rows: list[_Row] = []
        self.full: Optional[KVCache] = None
        self.rope = self.model.rope_tables(self.model.max_length)
        self.state: Optional[LeanState] = None
        self.token = None  # the token-level layers (thresholds and gather weights), shared by the lane
        self.compacts: list[dict] = []  # per row: layer -> (w13, w2), sentence-level lanes

    @property
    def slot(self) -> int:
        return self.state.slot if self.state is not None else 0

    def _allocate(self, rows: int, capacity: int) -> None:
        """Grow the cache to at least ``rows`` x ``capacity``, keeping what it holds."""
        old = self.full
        have_rows, have_cap = (old.valid.shape if old is not None else (0, 0))
        if rows <= have_rows and capacity <= have_cap:
            return
        # Each dimension grows only when short, by doubling: joins and long answers copy the cache
        # a few times, not every step (doubling slots on a new row once took a lane to 3 GB).
        rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        capacity = have_cap if capacity <= have_cap else max(capacity, 2 * have_cap, 64)
        new = KVCache.allocate(self.model, rows, min(capacity, self.model.max_length))
        if old is not None:
            n, s = len(self.rows), self.slot
            for src, dst in zip(old.keys + old.values, new.keys + new.values):
                dst[:n, :, :s] = src[:n, :, :s]
            new.valid[:n, :s] = old.valid[:n, :s]
        self.full = new

    def _shift(self, by: int) -> None:
        """Move every row's slots ``by`` places (right if positive), keeping the alignment."""
        n, s = len(self.rows), self.slot
        start, end = max(0, -by), s
        for t in self.full.keys + self.full.values:
            t[:n, :, start + by : end + by] = t[:n, :, start:end].clone()
        valid = self.full.valid
        valid[:n, start + by : end + by] = valid[:n, start:end].clone()
        if by > 0:
            valid[:n, :by] = False
        else:
            valid[:n, end + by :] = False
        self.state.slot += by

    def join(self, request: _Running, rows: list[int], prompt_state: LeanState, width: int) -> None:
        """Place ``request``'s sequences ``rows`` (rows of its own prefilled ``prompt_state``) in the lane."""
        n = len(self.rows)
        if n == 0:
            no_rows = torch.zeros(0, dtype=torch.long, device=self.model.device)  # positions live beside the rope tables
            self.state = LeanState(None, {}, self.rope, no_rows, width, True)
            self._allocate(len(rows), width + 1)
        elif self.slot < width:  # the newcomer's prompt is longer than the lane's history: make room on the left
            self._allocate(n + len(rows), width + 1)
            self._shift(width - self.slot)
        self._allocate(n + len(rows), self.slot + 1)
        slot = self.slot
        for k, row in enumerate(rows):
            for src, dst in zip(prompt_state.cache.keys + prompt_state.cache.values, self.full.keys + self.full.values):
                dst[n + k, :, slot - width : slot] = src[row, :, :width]
            self.full.valid[n + k] = False
            self.full.valid[n + k, slot - width : slot] = prompt_state.cache.valid[row, :width]
            self.rows.append(_Row(request, row, -1))
            self.compacts.append({layer: (c.w13[row], c.w2[row]) for layer, c in prompt_state.compacts.items()})
        if prompt_state.token is not None:
            self.token = prompt_state.token
        self.state.positions = torch.cat([self.state.positions, prompt_state.positions[rows]])
        self._rebuild()

    def leave(self, lane_row: int) -> None:
        """Drop one sequence: the last row moves into its place."""
        last = len(self.rows) - 1
        if lane_row != last:
            for t in self.full.keys + self.full.values:
                t[lane_row] = t[last]
            self.full.valid[lane_row] = self.full.valid[last]
            self.state.positions[lane_row] = self.state.positions[last]
            self.rows[lane_row], self.compacts[lane_row] = self.rows[last], self.compacts[last]
        self.full.valid[last] = False
        self.rows.pop()
        self.compacts.pop()
        self.state.positions = self.state.positions[:last].clone()
        self._rebuild()

    def _rebuild(self) -> None:
        """The lean step's view of the first ``len(rows)`` rows."""
        n = len(self.rows)
        state = self.state
        state.cache = KVCache([k[:n] for k in self.full.keys], [v[:n] for v in self.full.values], self.full.valid[:n])
        layers = self.compacts[0].keys() if n and self.compacts[0] else ()
        state.compacts = {layer: CompactLayer([c[layer][0] for c in self.compacts], [c[layer][1] for c in self.compacts])
                          for layer in layers}
        state.token = self.token if n else None
        state.session = _RowCounts(self.rows) if self.token is not None and n else None

    def _make_room(self) -> None:
        """Before a step: a free slot at the end, by dropping the slots no row uses any more, or by growing."""
        if self.slot < self.full.valid.shape[1]:
            return
        n = len(self.rows)
        used = self.full.valid[:n, : self.slot]
        unused = int(used.float().argmax(-1).min()) if used.any() else self.slot
        if unused > 0:
            self._shift(-unused)
        else:
            self._allocate(n, self.slot + 1)
            if self.slot >= self.full.valid.shape[1]:
                raise ValueError(f"the lane's sequences span more than the model's {self.slot} positions")
        self._rebuild()

    def step(self) -> torch.Tensor:
        self._make_room()
        device = self.full.valid.device
        tokens = torch.tensor([row.next_token for row in self.rows], device=device)
        return self.backend.step(self.state, tokens)


class PrefixStore:
    """Single prompts' keys and values, kept after their lean prefill so that a later prompt beginning
    with the same tokens (a chat template's system prompt, an earlier turn) reads only the rest, as
    llama.cpp's prompt cache and vLLM's prefix caching do. Bounded in bytes, the least recently used
    going first. A key's value depends only on the tokens before it, so a kept prefix gives the numbers
    a fresh prefill gives (bitwise on SmolLM2; ``tests/test_scheduler.py``)."""

    def __init__(self, max_bytes: int, min_tokens: int = MIN_PREFIX):
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.entries: OrderedDict[tuple[int, ...], PromptCache] = OrderedDict()
        self.hits = 0

    def longest(self, tokens: Sequence[int]) -> Optional[PromptCache]:
        """The kept columns of the longest prefix ``tokens`` shares with a kept prompt (leaving at least
        its last token to read), or None below ``min_tokens``."""
        best, length = None, 0
        for kept in self.entries:
            shared = 0
            for a, b in zip(kept, tokens[: len(tokens) - 1]):
                if a != b:
                    break
                shared += 1
            if shared > length:
                best, length = kept, shared
        if best is None or length < self.min_tokens:
            return None
        self.entries.move_to_end(best)
        self.hits += 1
        return self.entries[best].columns(length)

    def add(self, tokens: Sequence[int], cache: PromptCache) -> None:
        """Keep ``cache``, one unpadded prompt's (its tensors as they are: nothing writes them later)."""
        key = tuple(tokens)
        kept = cache.columns(len(key))
        if kept.nbytes() > self.max_bytes:
            return
        self.entries.pop(key, None)
        self.entries[key] = kept
        while sum(c.nbytes() for c in self.entries.values()) > self.max_bytes:
            self.entries.popitem(last=False)


def lane_kind(sparsity: Optional[SparsityConfig]) -> str:
    """Which lane decodes ``sparsity`` (already resolved to a number)."""
    if sparsity is None:
        return "dense"
    if sparsity.token:
        return f"token:{sparsity.keep:g}:{sparsity.targets}"
    return "sentence"


class Scheduler:
    """Runs submissions on ``engine`` with continuous batching (see the module's docstring).

    ``max_batch`` sequences decode at once; ``max_queue`` submissions may wait for room, each at
    most ``queue_timeout`` seconds. A submission with more sequences than ``max_batch`` runs
    when it is alone.
    """

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, queue_timeout: float = 60.0):
        check_limits(max_batch, max_queue, queue_timeout)
        self.engine, self.max_batch, self.max_queue, self.queue_timeout = engine, max_batch, max_queue, queue_timeout
        self.waiting: deque[Submission] = deque()
        self.lanes: dict[tuple[int, str], Lane] = {}
        self.wake = threading.Condition()
        self.stopped = False
        self.starting = 0  # sequences admitted and being prefilled
        self.prefills = 0  # prefill forward passes run (several waiting requests share one)
        self.steps = 0  # decode steps run, over all lanes
        self.peak = 0  # most sequences one step decoded together
        self.prefixes: dict[int, PrefixStore] = {}  # id(backend) -> kept prompts
        self.thread = threading.Thread(target=self._loop, name="coreinfer-scheduler", daemon=True)
        self.thread.start()

    # The callers' side

    def submit(self, prompts: Sequence[Sequence[int]], sparsity: Optional[SparsityConfig] = None,
               sampling: SamplingConfig = SamplingConfig(),
               on_token: Optional[Callable[[TokenEvent], None]] = None,
               on_done: Optional[Callable[[], None]] = None,
               on_admitted: Optional[Callable[[], None]] = None) -> Submission:
        """Queue one batch of prompts; raises ``QueueFull`` when ``max_queue`` are waiting already.

        ``on_token`` sees each token's event, ``on_admitted`` its leaving the queue and ``on_done``
        the end, all on the scheduler's side.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        sub = Submission([list(p) for p in prompts], sparsity, sampling, on_token, on_done=on_done,
                         on_admitted=on_admitted)
        with self.wake:
            # Waiting for the next free slot is not queueing; waiting behind a full batch is.
            queued = len(self.waiting) - max(0, self.max_batch - self.active)
            if queued >= self.max_queue:
                raise QueueFull(len(self.waiting), retry_after=max(1, round(self.queue_timeout / 10)))
            self.waiting.append(sub)
            self.wake.notify()
        return sub

    def generate(self, prompts, sparsity=None, sampling: SamplingConfig = SamplingConfig(), on_token=None,
                 timeout: Optional[float] = None) -> list[GenerationResult]:
        """Submit and wait: ``Engine.generate_ids``'s results, decoded beside whatever else runs."""
        return self.submit(prompts, sparsity, sampling, on_token).wait(timeout)

    def close(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=10)

    @property
    def active(self) -> int:
        """Sequences decoding now, or being prefilled to."""
        return self.starting + sum(len(lane.rows) for lane in list(self.lanes.values()))

    # The scheduler's thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    if not self.stopped and not self.waiting and not self.active:
                        release_free_memory()
                    while not self.stopped and not self.waiting and not self.active:
                        self.wake.wait()
                    if self.stopped:
                        break
                self._expire()
                self._admit()
                self._step_lanes()
        for lane in self.lanes.values():
            for row in lane.rows:
                row.request.sub.fail(Cancelled("the server is shutting down"))
        with self.wake:
            for sub in self.waiting:
                sub.fail(Cancelled("the server is shutting down"))

    def _expire(self) -> None:
        now = time.monotonic()
        with self.wake:
            keep = deque()
            for sub in self.waiting:
                if sub.cancelled:
                    sub.fail(Cancelled("cancelled while waiting"))
                elif now - sub.submitted > self.queue_timeout:
                    sub.fail(QueueTimeout(f"waited {now - sub.submitted:.0f} s for a free slot (the limit is "
                                          f"{self.queue_timeout:g} s); the server is busy, retry later"))
                else:
                    keep.append(sub)
            self.waiting = keep

    def _admit(self) -> None:
        """Start the waiting submissions that fit, oldest first: those that prefill alike in one
        batched prefill (the others' stall, once), the rest one by one."""
        group = []
        with self.wake:
            room = self.max_batch - self.active
            while self.waiting and (len(self.waiting[0].prompts) <= room or not (self.active or group)):
                sub = self.waiting.popleft()
                group.append(sub)
                room -= len(sub.prompts)
            self.starting = sum(len(sub.prompts) for sub in group)
        try:
            plain: dict[int, list] = {}  # id(backend) -> (submission, backend, sparsity): dense prefills, no recording
            for sub in group:
                sub.admit()
                try:
                    planned = self._plan(sub)
                except Exception as err:  # a bad request fails alone; the others decode on
                    sub.fail(err)
                    continue
                if planned is None:
                    continue
                backend, sparsity = planned
                if sparsity is None or sparsity.token:
                    plain.setdefault(id(backend), []).append((sub, backend, sparsity))
                else:  # sentence-level: its prefill records its own activations
                    self._guarded(self._prefill, [(sub, backend, sparsity)])
            for items in plain.values():
                self._guarded(self._prefill, items)
        finally:
            self.starting = 0

    def _guarded(self, start: Callable, items: list) -> None:
        try:
            start(items)
        except Exception as err:
            for sub, _, _ in items:
                sub.fail(err)

    def _plan(self, sub: Submission):
        """``(backend, resolved sparsity)`` for a submission the lanes decode; None once handed to a serial run."""
        engine = self.engine
        length = max(len(p) for p in sub.prompts) + sub.sampling.max_new_tokens
        with engine.lock:
            backend = engine.backend(None, None, length=length)
            sparsity = engine.resolve(sub.sparsity, backend)
        if not isinstance(backend, LeanBackend) or (sparsity is not None and sparsity.auto):
            threading.Thread(target=self._run_serial, args=(sub,), daemon=True).start()
            return None
        if length > backend.max_length:
            raise ValueError(f"prompt + max_tokens is {length} tokens; the lean backend decodes at most "
                             f"{backend.max_length}")
        return backend, sparsity

    def _prefill(self, items: list) -> None:
        """One prefill for every submission of ``items`` (same backend), then each joins its lane."""
        engine = self.engine
        backend = items[0][1]
        prompts = [p for sub, _, _ in items for p in sub.prompts]
        with engine.lock:
            start = time.perf_counter()
            ids, mask = engine.left_pad(prompts)
            sentence = items[0][2] is not None and not items[0][2].token
            session = engine.new_session(items[0][2], mask) if sentence else None  # (alone in items)
            if not sentence and backend.prefills:
                # One unpadded prompt may start from a kept prefix (batched prompts are left-padded apart).
                single = prompts[0] if len(prompts) == 1 else None
                store = self.prefixes.setdefault(id(backend), PrefixStore(PREFIX_BYTES))
                past = store.longest(single) if single is not None else None
                logits, hf_cache, stepped = self._interleaved_prefill(backend, ids, mask, [sub for sub, _, _ in items],
                                                                      past)
                if logits is None:
                    return
                if single is not None:
                    store.add(single, hf_cache)
            else:
                logits, hf_cache = engine.prefill(ids, mask, session, backend=backend)
                stepped = 0.0
            prefill_s = time.perf_counter() - start - stepped
            self.prefills += 1
            first_row = 0
            for sub, _, sparsity in items:
                rows = slice(first_row, first_row + len(sub.prompts))
                first_row = rows.stop
                start = time.perf_counter()
                own = session if sentence else engine.new_session(sparsity, mask[rows])
                state = backend.start(own, PromptCache.rows_of(hf_cache, rows), mask[rows], ids.shape[1] + 1)
                self._launch(sub, backend, sparsity, own, logits[rows, -1, :], state, ids.shape[1],
                             prefill_s, time.perf_counter() - start)

    def _interleaved_prefill(self, backend: LeanBackend, ids: torch.Tensor, mask: torch.Tensor, subs: list,
                             past: Optional[PromptCache] = None):
        """The lean prefill a chunk of columns at a time, the running lanes taking a step between
        chunks: a long prompt holds the others back by one chunk at a time, not its whole prefill.
        Returns the logits, the cache and the seconds spent stepping the others (None, None, s once
        every submission in it was cancelled: they fail here)."""
        steps, stepped = backend.prefill_steps(ids, mask, past), 0.0
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return (*done.value, stepped)
            if all(sub.cancelled for sub in subs):
                for sub in subs:
                    sub.fail(Cancelled("cancelled while its prompt was read"))
                return None, None, stepped
            start = time.perf_counter()
            self._step_lanes()
            stepped += time.perf_counter() - start

    def _launch(self, sub: Submission, backend: LeanBackend, sparsity, session, logits: torch.Tensor,
                prompt_state: LeanState, width: int, prefill_s: float, select_s: float) -> None:
        """Take the first tokens from the prefill's logits; the sequences still going join their lane."""
        engine, sampling = self.engine, sub.sampling
        seqs = [_Sequence(len(p), engine.generator(sampling.seed)) for p in sub.prompts]
        tracker = _Tracker(engine, seqs, sampling, engine.eos_ids(), sub.on_token)
        running = _Running(sub, engine, backend, sparsity, session, seqs, tracker)
        running.prefill_s, running.select_s = prefill_s, select_s
        first = pick_tokens(logits, sampling, seqs)
        if running.advance(dict(enumerate(first))):
            running.finish()
            return
        live = [i for i, s in enumerate(seqs) if not s.finish_reason]
        lane = self._lane(backend, lane_kind(sparsity))
        lane.join(running, live, prompt_state, width)
        for row in lane.rows[len(lane.rows) - len(live):]:
            row.next_token = first[row.index]
        running.decode_start = time.perf_counter()

    def _lane(self, backend: LeanBackend, kind: str) -> Lane:
        key = (id(backend), kind)
        if key not in self.lanes:
            self.lanes[key] = Lane(backend, kind)
        return self.lanes[key]

    def _run_serial(self, sub: Submission) -> None:
        def on_token(event: TokenEvent) -> None:
            if sub.cancelled:
                raise Cancelled("cancelled")
            if sub.on_token is not None:
                sub.on_token(event)

        try:  # Engine.generate_ids holds engine.lock throughout: the lanes wait for it
            sub.complete(self.engine.generate_ids(sub.prompts, sub.sparsity, sub.sampling, on_token))
        except Exception as err:
            sub.fail(Cancelled(str(err) or "cancelled") if sub.cancelled else err)

    def _step_lanes(self) -> None:
        # An empty lane keeps its cache for the next joiner: freeing and re-allocating caches of
        # other sizes grew the process by a third over a 200-request soak (the allocator keeps them).
        for key, lane in list(self.lanes.items()):
            if not lane.rows:
                continue
            self._drop_cancelled(lane)
            if not lane.rows:
                continue
            try:
                with self.engine.lock:
                    logits = lane.step()
            except Exception as err:  # fail this lane's requests, not the scheduler
                for row in lane.rows:
                    row.request.sub.fail(err)
                del self.lanes[key]
                continue
            self.steps += 1
            self.peak = max(self.peak, logits.shape[0])
            self._hand_out(lane, logits)

    def _drop_cancelled(self, lane: Lane) -> None:
        for lane_row in reversed(range(len(lane.rows))):
            sub = lane.rows[lane_row].request.sub
            if sub.cancelled:
                lane.leave(lane_row)
                sub.fail(Cancelled("cancelled"))  # no-op if it failed already

    def _hand_out(self, lane: Lane, logits: torch.Tensor) -> None:
        """Pick each sequence's next token with its own request's sampling; drop the finished."""
        by_request: dict[int, tuple[_Running, list[int]]] = {}
        for lane_row, row in enumerate(lane.rows):
            by_request.setdefault(id(row.request), (row.request, []))[1].append(lane_row)
        finished, completed = [], []
        for request, lane_rows in by_request.values():
            seqs = [request.seqs[lane.rows[r].index] for r in lane_rows]
            tokens = pick_tokens(logits[lane_rows], request.sub.sampling, seqs)
            chosen = {lane.rows[r].index: t for r, t in zip(lane_rows, tokens)}
            all_done = request.advance(chosen)
            for r, t in zip(lane_rows, tokens):
                lane.rows[r].next_token = t
                if all_done or request.seqs[lane.rows[r].index].finish_reason:
                    finished.append(r)
            if all_done:
                completed.append(request)
        for r in sorted(finished, reverse=True):
            lane.leave(r)
        for request in completed:  # after leaving: whoever waits on it finds its slots free
            request.finish()
