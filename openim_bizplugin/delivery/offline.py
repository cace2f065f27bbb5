"""Offline policies for user recipients (SPEC §4): store, hold, drop.

``store`` sends at once (OpenIM keeps persistent notifications for sync).
``hold`` keeps the recipient ``held`` while the user is offline: a user.online
callback makes it due at once, and it is rechecked every
``delivery.hold_recheck_seconds`` until its TTL in case that callback was
lost. ``drop`` skips users who are offline at send time. Presence comes from
OpenIM's callbacks, which are lossy periodic level reports: when what they
said is older than ``delivery.presence_max_age_seconds`` (or the TTL is
close), OpenIM's ``/user/get_users_online_status`` decides instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import Config
from ..openim.client import OpenIMClient, OpenIMError
from ..store.base import Outcome, Store, WorkItem

Record = Callable[[WorkItem, Outcome], None]
Decide = Callable[[WorkItem, OpenIMError], Outcome]


class OfflinePolicy:
    """Decides, per leased user recipient, whether it goes out now."""

    def __init__(self, config: Config, store: Store, openim: OpenIMClient,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = config.delivery
        self.store, self.openim, self.clock = store, openim, clock

    def apply(self, items: list[WorkItem], decide: Decide, record: Record) -> list[WorkItem]:
        """Record held/skipped outcomes for offline users; return the items to send now."""
        waiting = [i for i in items if i.kind == "user" and i.offline in ("hold", "drop")]
        if not waiting:
            return items
        waiting_ids = {id(i) for i in waiting}
        try:
            online = self._online({i.target for i in waiting},
                                  near_end={i.target for i in waiting if self._near_end(i)})
        except OpenIMError as error:
            for item in waiting:
                record(item, decide(item, error))
            return [i for i in items if id(i) not in waiting_ids]
        now_ms = self._now_ms()
        send_now = []
        for item in items:
            if id(item) not in waiting_ids or online.get(item.target, False):
                send_now.append(item)
            elif item.offline == "drop":
                record(item, Outcome.skipped("user offline at send time (offline = drop)"))
            else:
                recheck = min(now_ms + int(self.settings.hold_recheck_seconds * 1000), item.expires_ms)
                record(item, Outcome.held("user offline; held until they come online", recheck))
        return send_now

    def _online(self, users: set[str], near_end: set[str]) -> dict[str, bool]:
        """Callback presence where fresh, OpenIM's live view for the rest."""
        known = self.store.presence(sorted(users))
        oldest_ms = self._now_ms() - int(self.settings.presence_max_age_seconds * 1000)
        online = {u: state.online for u, state in known.items() if state.updated_ms >= oldest_ms}
        ask = sorted((users - online.keys()) | near_end)
        if ask:
            live = self.openim.users_online(ask)
            online.update({u: bool(live.get(u)) for u in ask})
        return online

    def _near_end(self, item: WorkItem) -> bool:
        # the last recheck before the TTL asks OpenIM: a lost online callback must not cost the message
        return item.expires_ms - self._now_ms() <= self.settings.hold_recheck_seconds * 1000

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)
