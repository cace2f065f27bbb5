"""Frequency control per type and recipient (``rate_limit`` in ``type.toml``).

"At most 3 per hour per user": before a recipient is sent, the messages of
the same type sent to it within the window are counted (plus the ones this
round already let through). Over the limit, ``rate_limit_policy = "delay"``
puts it back until the window allows (never past the TTL: it expires
instead), and ``"drop"`` ends it ``throttled``. Delivery threads of one
process share their approvals (what one thread let through is not yet
"sent" when the next one counts); separate processes only see each other's
sends, so each may let a few too many through at the edge of a window.

Nothing is counted per recipient while no more messages of the type than
the limit allows can have been sent in the window (a message is sent only
after a worker leased it and never after it expires): then no recipient can
have reached it. Such a round's recipients still take their slots in this
process's approvals, but only once a later round of the type counts. And
the store's sends are not counted while no other process held a lease on a
message of the type since the window began, and this one sent none of it
without a limit (accepted before the type had one): then every send in it
was let through here, and the approvals hold them all.

A slot is given back when nothing was sent after all (OpenIM unreachable or
refusing, the lease given back): an outage that retries a recipient ten times
does not use up its window.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from ..catalog.registry import RateLimit
from ..store.base import Outcome, Store, WorkItem

Record = Callable[[WorkItem, Outcome], None]
# a send can be recorded a little after its message expired: leased before the expiry, answered after
SEND_OVERRUN_MS = 600_000
FORGET_ABOVE = 100_000  # recipients with approvals kept (per type) before those whose window passed are dropped


def _take(counts: Counter[str], name: str) -> bool:
    """Take one *name* from *counts*; False when none is left."""
    if counts[name] > 0:
        counts[name] -= 1
        return True
    return False


class RecipientThrottle:
    """Applies each type's per-recipient rate limit to a round of items."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store, self.clock = store, clock
        # this process's recent approvals: (kind, type) -> target -> when
        self._approved: dict[tuple[str, str], dict[str, list[int]]] = {}
        # rounds let through without a count: (when, their targets joined by newlines: ids hold no
        # control characters), added to _approved when next needed. One string per round, not an
        # object per recipient kept for the whole window (~60 bytes each: bench_delivery's memory)
        self._uncounted: dict[tuple[str, str], deque[tuple[int, str]]] = {}
        # type -> when this process last let through messages of it that had no limit (not approved)
        self._unlimited: dict[str, int] = {}
        self._lock = threading.Lock()
        self._forget_above = FORGET_ABOVE

    def apply(self, items: list[WorkItem], record: Record) -> list[WorkItem]:
        """Record delayed/throttled outcomes; return the items that may go now (in order).

        A batch's users are counted one by one: those over the limit are split off
        it with their own outcome, and the batch goes on with the rest.
        """
        now_ms = int(self.clock() * 1000)
        limited: dict[tuple[str, str, str], list[WorkItem]] = {}  # (kind, type, rate) -> items
        unlimited = set()
        for item in items:
            if text := item.delivery.get("rate_limit"):
                limited.setdefault((item.kind, item.type, text), []).append(item)
            else:
                unlimited.add(item.type)
        if unlimited:  # accepted before the type had a limit: a later limit counts them (from the store)
            self._unlimited.update(dict.fromkeys(unlimited, now_ms))
        held_back: set[int] = set()
        split: dict[int, set[int]] = {}  # id(batch) -> indexes of its members held back
        for (kind, type_, text), group in limited.items():
            limit = RateLimit.parse(text)
            window_ms = limit.period_seconds * 1000
            targets: list[str] = []
            starts = []  # where each item's targets begin in *targets*: a batch has one per member
            for item in group:
                starts.append(len(targets))
                if item.members is None:
                    targets.append(item.target)
                else:
                    targets.extend([user for _seq, user in item.members])
            # While no more messages of the type than the limit (this round's included: leased) may have
            # been sent in the window, no recipient can reach it: one query instead of a count per
            # recipient (a fan-out's common case, bench_delivery). Each still takes its slot in this
            # process's approvals, so that a message leased while these are in flight counts them.
            since_ms = now_ms - window_ms - SEND_OVERRUN_MS
            if self.store.messages_started(type_, since_ms, limit.count + 1) <= limit.count:
                self._let_through(kind, type_, targets, now_ms, window_ms)
                continue
            if (self._unlimited.get(type_, since_ms) > since_ms
                    or self.store.leased_elsewhere(type_, group[0].lease_owner, since_ms)):
                # one query per round and type, not one per recipient (a Redis round trip each)
                sent = self.store.sent_counts(kind, list(dict.fromkeys(targets)), type_, now_ms - window_ms)
            else:  # each send of the type in the window was let through here: the approvals have them all
                sent = {}
            for at, first_ms in self._refused(kind, type_, targets, sent, limit.count, now_ms, window_ms):
                k = bisect.bisect_right(starts, at) - 1
                item = group[k]
                if item.members is None:
                    held_back.add(id(item))
                    who = item
                else:
                    split.setdefault(id(item), set()).add(at - starts[k])
                    who = item.member(*item.members[at - starts[k]])
                if item.delivery.get("rate_limit_policy") == "drop":
                    record(who, Outcome.throttled(f"dropped: {item.type} rate limit {limit.text} reached"))
                else:
                    opens_ms = (first_ms or now_ms) + window_ms
                    record(who, Outcome.deferred(f"delayed: {item.type} rate limit {limit.text}", opens_ms))
        if not held_back and not split:
            return self._mark_approved(items, now_ms)
        send_now = []
        for item in items:
            if id(item) in split:
                gone = split[id(item)]
                item.members = [member for n, member in enumerate(item.members) if n not in gone]
                if not item.members:  # nothing left to send: the batch is done
                    record(item, Outcome.skipped("every user of it was held back by the rate limit"))
                    continue
                item.seq, item.target = item.members[0]
            if id(item) not in held_back:
                send_now.append(item)
        return self._mark_approved(send_now, now_ms)

    @staticmethod
    def _mark_approved(items: list[WorkItem], now_ms: int) -> list[WorkItem]:
        for item in items:
            if item.delivery.get("rate_limit"):
                item.approved_ms = now_ms
        return items

    def give_back(self, unsent: list[WorkItem]) -> None:
        """Free the slots of items let through by :meth:`apply` that were not sent after all."""
        names: dict[tuple[str, str, int], Counter[str]] = {}
        for item in unsent:
            if item.approved_ms is not None:
                users = [item.target] if item.members is None else [user for _seq, user in item.members]
                names.setdefault((item.kind, item.type, item.approved_ms), Counter()).update(users)
                item.approved_ms = None  # given back once
        with self._lock:
            for (kind, type_, when), left in names.items():
                rounds = self._uncounted.get((kind, type_))
                if rounds:
                    kept_rounds: deque[tuple[int, str]] = deque()
                    for at, joined in rounds:
                        if at == when:
                            kept = [t for t in joined.split("\n") if not _take(left, t)]
                            joined = "\n".join(kept) if kept else ""
                        if joined:
                            kept_rounds.append((at, joined))
                    self._uncounted[(kind, type_)] = kept_rounds
                approved = self._approved.get((kind, type_), {})
                for target, n in left.items():
                    recent = approved.get(target)
                    while n > 0 and recent and when in recent:
                        recent.remove(when)
                        n -= 1

    def _let_through(self, kind: str, type_: str, targets: list[str], now_ms: int, window_ms: int) -> None:
        """*targets* take their slots without a count: kept as one entry, not one per recipient,
        until a round of the type counts (:meth:`_refused`); dropped once their window passed."""
        with self._lock:
            rounds = self._uncounted.setdefault((kind, type_), deque())
            while rounds and rounds[0][0] <= now_ms - window_ms:
                rounds.popleft()
            rounds.append((now_ms, "\n".join(targets)))

    def _refused(self, kind: str, type_: str, targets: list[str], sent: dict[str, tuple[int, int]],
                 count: int, now_ms: int, window_ms: int) -> list[tuple[int, int | None]]:
        """Take a slot in the window for each of *targets* unless the sends recorded, or this
        process's approvals, fill it; returns the indexes refused, with the first send or approval
        that fills their window.
        Runs per recipient in a round: kept to plain loops (bench_delivery, custom mode)."""
        cutoff = now_ms - window_ms
        refused = []
        no_sends = (0, None)
        with self._lock:  # once per group: the approvals are shared by this process's threads
            approved = self._approved.setdefault((kind, type_), {})
            for when, earlier in self._uncounted.pop((kind, type_), ()):
                if when > cutoff:
                    for target in earlier.split("\n"):
                        approved.setdefault(target, []).append(when)
            for at, target in enumerate(targets):
                recent = approved.get(target)  # oldest first (threads may swap neighbours by a few ms)
                if recent is None:
                    recent = approved[target] = []
                elif recent and recent[0] <= cutoff:  # copied only when some have left the window
                    recent = approved[target] = [t for t in recent if t > cutoff]
                sent_count, first_ms = sent.get(target, no_sends)
                if sent_count >= count or len(recent) >= count:
                    # the window has room again once the first send, or approval, that fills it left it
                    oldest = recent[0] if len(recent) >= count else None
                    refused.append((at, max((t for t in (first_ms, oldest) if t is not None), default=None)))
                else:
                    recent.append(now_ms)
            if len(approved) > self._forget_above:  # forget windows that have passed
                approved = {k: v for k, v in approved.items() if v and v[-1] > cutoff}
                self._approved[(kind, type_)] = approved
                # rebuilt only once it has doubled again: not on every round when all are recent
                self._forget_above = max(FORGET_ABOVE, 2 * len(approved))
        return refused
