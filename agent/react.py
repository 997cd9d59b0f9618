"""``vcpu-agent react``: run a command once per matching transition, exactly once.

The command gets the transition as ``VCPU_*`` environment variables and as its
JSON body on stdin. Exactly once rests on three things (docs/subscribers.md):

1. a durable session (``agent.client``): the broker keeps transitions for us while
   we are away and redelivers the ones we never acknowledged;
2. the ledger (``agent.ledger``): a row ``running`` is committed *before* the hook
   starts and ``done``/``failed`` after it ends, and only then is the transition
   acknowledged. A redelivered transition whose row is ``done`` or ``failed`` is
   acknowledged without running anything;
3. at start, every row still ``running`` (the hook was cut off by a crash of
   ``react`` or of the host) is run once more with ``VCPU_RERUN=1``; one cut off
   again is given up and logged (``react.rerun_abandoned``), never looped.

Hooks of one vCPU run one after the other, in seq order; hooks of different vCPUs
run in parallel, at most ``concurrency`` at once. A hook that exits non-zero or
outlives ``timeout`` (its whole process group is killed) is logged with its exit
status and retried ``retries`` times with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent import logs
from agent.chain import ChainBroken, EpochChanged, SeqGap
from agent.client import Subscriber
from agent.conditions import Condition, DomainWatch, Firing
from agent.ledger import Ledger, Status
from agent.payloads import Transition, rfc3339

log = logs.get("agent.react")

MAX_ATTEMPTS_AFTER_CRASH = 2  # the interrupted run and its one rerun
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for a hook that timed out


class MatchError(ValueError):
    """A ``--match`` condition that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class Match:
    """All conditions must hold; an empty Match takes every transition."""

    hosts: tuple[str, ...] = ()  # globs
    domains: tuple[str, ...] = ()  # globs
    vcpus: frozenset[int] = frozenset()
    from_states: frozenset[str] = frozenset()
    to_states: frozenset[str] = frozenset()
    resync: bool | None = None

    @classmethod
    def parse(cls, conditions: Sequence[str]) -> Match:
        """``host=GLOB``, ``domain=GLOB``, ``vcpu=N[,N]``, ``from=S[,S]``, ``to=S[,S]``,
        ``resync=true|false``; a key given twice accepts either value."""
        found: dict[str, list[str]] = {}
        for condition in conditions:
            key, sep, value = condition.partition("=")
            key = key.strip()
            if not sep or key not in ("host", "domain", "vcpu", "from", "to", "resync"):
                raise MatchError(
                    f"--match {condition!r}: expected KEY=VALUE with KEY one of "
                    "host, domain, vcpu, from, to, resync"
                )
            found.setdefault(key, []).extend(v.strip() for v in value.split(","))
        try:
            vcpus = frozenset(int(v) for v in found.get("vcpu", []))
        except ValueError as err:
            raise MatchError(f"--match vcpu=: {err}") from err
        resync = found.get("resync", [])
        if any(v not in ("true", "false") for v in resync) or len(set(resync)) > 1:
            raise MatchError("--match resync=: expected true or false")
        return cls(
            hosts=tuple(found.get("host", [])),
            domains=tuple(found.get("domain", [])),
            vcpus=vcpus,
            from_states=frozenset(found.get("from", [])),
            to_states=frozenset(found.get("to", [])),
            resync=None if not resync else resync[0] == "true",
        )

    def __call__(self, t: Transition) -> bool:
        return (
            (not self.hosts or any(fnmatch.fnmatchcase(t.host, g) for g in self.hosts))
            and (not self.domains or any(fnmatch.fnmatchcase(t.domain, g) for g in self.domains))
            and (not self.vcpus or t.vcpu in self.vcpus)
            and (not self.from_states or t.from_state in self.from_states)
            and (not self.to_states or t.to_state in self.to_states)
            and (self.resync is None or t.resync == self.resync)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    command: tuple[str, ...]
    timeout: float = 60.0
    concurrency: int = 4
    retries: int = 2
    retry_delay: float = 1.0


def hook_env(t: Transition, *, rerun: bool, attempt: int) -> dict[str, str]:
    return {
        "VCPU_HOST": t.host,
        "VCPU_DOMAIN": t.domain,
        "VCPU_UUID": t.uuid,
        "VCPU_INDEX": str(t.vcpu),
        "VCPU_FROM": t.from_state,
        "VCPU_TO": t.to_state,
        "VCPU_SOURCE": t.source,
        "VCPU_SEQ": str(t.seq),
        "VCPU_EPOCH": t.epoch,
        "VCPU_AT": t.at,
        "VCPU_CHANGED_AT": t.changed_at,
        "VCPU_PREVIOUS_DURATION_S": repr(t.previous_duration_s),
        "VCPU_RESYNC": "1" if t.resync else "0",
        "VCPU_RERUN": "1" if rerun else "0",
        "VCPU_ATTEMPT": str(attempt),
    }


def condition_env(f: Firing, *, rerun: bool, attempt: int) -> dict[str, str]:
    return {
        "VCPU_CONDITION": f.condition,
        "VCPU_HOLD_S": repr(f.hold),
        "VCPU_HOST": f.host,
        "VCPU_DOMAIN": f.domain,
        "VCPU_UUID": f.uuid,
        "VCPU_VCPUS": ",".join(str(n) for n in f.vcpus),
        "VCPU_SINCE": rfc3339(f.since),
        "VCPU_EPOCH": f.key[0],
        "VCPU_RERUN": "1" if rerun else "0",
        "VCPU_ATTEMPT": str(attempt),
    }


async def run_hook(
    command: Sequence[str], stdin: bytes, env: Mapping[str, str], timeout: float
) -> str:
    """Run the command once; its outcome: ``exit 0``, ``exit 3``, ``signal 9``, ``timeout``,
    ``cannot start: ...``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
    except OSError as err:
        return f"cannot start: {err}"
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it need not read
        proc.stdin.write(stdin + b"\n")
        await proc.stdin.drain()
        proc.stdin.close()
    try:
        async with asyncio.timeout(timeout):
            code = await proc.wait()
    except TimeoutError:
        await _kill(proc)
        return "timeout"
    return f"exit {code}" if code >= 0 else f"signal {-code}"


async def _kill(proc: asyncio.subprocess.Process) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_GRACE):
                await proc.wait()
        if proc.returncode is not None:
            return


class Reactor:
    """Consumes a durable subscriber; runs hooks; keeps the ledger; acknowledges."""

    def __init__(
        self,
        sub: Subscriber,
        ledger: Ledger,
        match: Match,
        policy: Policy,
        conditions: tuple[Condition, ...] = (),
    ) -> None:
        self.sub = sub
        self.ledger = ledger
        self.match = match
        self.policy = policy
        # With conditions, the command runs on them, not on each transition.
        self.watch = DomainWatch(conditions) if conditions else None
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.concurrency)
        self._backlog = asyncio.Semaphore(policy.concurrency * 16)  # hooks queued at most
        self._tails: dict[tuple[str, str, int], asyncio.Task[None]] = {}
        self._active: set[tuple[str, str, int, str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.completed = 0

    async def run(self, stop: asyncio.Event) -> None:
        interrupted = self.ledger.interrupted()
        log.info(
            "react.started",
            client_id=self.sub.client_id,
            ledger=str(self.ledger.path),
            interrupted=len(interrupted),
        )
        for it in interrupted:
            if it.attempts >= MAX_ATTEMPTS_AFTER_CRASH:
                log.error(
                    "react.rerun_abandoned",
                    seq=it.transition.seq,
                    **_where(it.transition),
                    attempts=it.attempts,
                )
                self.ledger.finish(it.transition, "failed", "interrupted twice")
                continue
            await self._schedule(it.transition, rerun=True)
        workers = {asyncio.create_task(self._consume())}
        if self.watch is not None:
            workers.add(asyncio.create_task(self._conditions(self.watch)))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({*workers, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        for worker in workers:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        if self._tasks:  # let running hooks finish (each is bounded by its timeout)
            await asyncio.wait(set(self._tasks))
        self.sub.flush()

    async def _consume(self) -> None:
        async for event in self.sub.aevents():
            if self.watch is not None:
                self.watch.apply(event)
                self._changed.set()
                if isinstance(event, Transition):
                    self.sub.commit(event, "done", "conditions only")
                continue
            if isinstance(event, Transition):
                await self._on_transition(event)
            elif isinstance(event, SeqGap):
                log.warning(
                    "react.gap",
                    **_where(event),
                    first=event.first,
                    last=event.last,
                    explained=event.explained,
                )
            elif isinstance(event, ChainBroken):
                log.warning(
                    "react.chain_broken",
                    **_where(event),
                    seq=event.seq,
                    expected=event.expected,
                    got=event.got,
                )
            elif isinstance(event, EpochChanged):
                log.warning("react.epoch_changed", host=event.host, old=event.old, new=event.new)

    async def _on_transition(self, t: Transition) -> None:
        if not self.match(t):
            self.sub.commit(t, "done", "not matched")
            return
        key = (t.host, t.uuid, t.vcpu, t.epoch, t.seq)
        if key in self._active:
            return  # a redelivery of a hook that runs now: acknowledged when it ends
        status = self.ledger.status(t)
        if status in ("done", "failed"):
            log.info("react.already_handled", seq=t.seq, **_where(t), status=status)
            self.sub.release(t)
            self.sub.flush()
            return
        await self._schedule(t, rerun=status == "running")

    async def _schedule(self, t: Transition, *, rerun: bool) -> None:
        await self._backlog.acquire()
        key = (t.host, t.uuid, t.vcpu, t.epoch, t.seq)
        self._active.add(key)
        vcpu = (t.host, t.uuid, t.vcpu)
        previous = self._tails.get(vcpu)
        task = asyncio.create_task(self._handle(t, rerun=rerun, after=previous))
        self._tails[vcpu] = task
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            self._active.discard(key)
            self._backlog.release()
            if self._tails.get(vcpu) is finished:
                del self._tails[vcpu]

        task.add_done_callback(done)

    async def _handle(
        self, t: Transition, *, rerun: bool, after: asyncio.Task[None] | None
    ) -> None:
        if after is not None:  # one vCPU's hooks run in seq order
            with contextlib.suppress(Exception):
                await asyncio.shield(after)
        self.ledger.start(t)  # committed before the hook starts
        outcome = ""
        for attempt in range(1, self.policy.retries + 2):
            async with self._slots:
                env = hook_env(t, rerun=rerun, attempt=attempt)
                outcome = await run_hook(self.policy.command, t.encode(), env, self.policy.timeout)
            if outcome == "exit 0":
                break
            log.warning(
                "react.hook_failed",
                seq=t.seq,
                **_where(t),
                outcome=outcome,
                attempt=attempt,
                retries=self.policy.retries,
            )
            if attempt <= self.policy.retries:
                await asyncio.sleep(self.policy.retry_delay * 2 ** (attempt - 1))
        status: Status = "done" if outcome == "exit 0" else "failed"
        self.ledger.finish(t, status, outcome)
        self.completed += 1
        log.info("react.hook_done", seq=t.seq, **_where(t), outcome=outcome, rerun=rerun)
        self.sub.release(t)
        self.sub.flush()

    async def _conditions(self, watch: DomainWatch) -> None:
        """Fire each whole-domain condition episode once, when it has held long enough."""
        while True:
            wait = watch.next_due(time.time())
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):  # None: until something changes
                    await self._changed.wait()
            for firing in watch.due(time.time()):
                if self.match.hosts and not any(
                    fnmatch.fnmatchcase(firing.host, g) for g in self.match.hosts
                ):
                    continue
                if self.match.domains and not any(
                    fnmatch.fnmatchcase(firing.domain, g) for g in self.match.domains
                ):
                    continue
                task = asyncio.create_task(self._fire(firing))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _fire(self, f: Firing) -> None:
        key = (f.host, f.uuid, f.condition, *f.key)
        status = self.ledger.condition_status(key)
        if status in ("done", "failed"):
            return  # fired before a restart: the retained tree brought the episode back
        rerun = status == "running"
        self.ledger.condition_mark(key, "running")
        outcome = ""
        for attempt in range(1, self.policy.retries + 2):
            async with self._slots:
                env = condition_env(f, rerun=rerun, attempt=attempt)
                body = json.dumps(f.as_dict()).encode()
                outcome = await run_hook(self.policy.command, body, env, self.policy.timeout)
            if outcome == "exit 0":
                break
            log.warning(
                "react.hook_failed",
                condition=f.condition,
                host=f.host,
                domain=f.domain,
                outcome=outcome,
                attempt=attempt,
            )
            if attempt <= self.policy.retries:
                await asyncio.sleep(self.policy.retry_delay * 2 ** (attempt - 1))
        self.ledger.condition_mark(key, "done" if outcome == "exit 0" else "failed", outcome)
        log.info(
            "react.condition_done",
            condition=f.condition,
            host=f.host,
            domain=f.domain,
            vcpus=list(f.vcpus),
            outcome=outcome,
            rerun=rerun,
        )


def _where(e: Transition | SeqGap | ChainBroken) -> dict[str, object]:
    return {"host": e.host, "domain": e.domain, "vcpu": e.vcpu, "epoch": e.epoch}
