"""Offline policies for user recipients (SPEC §4, §5): store, hold, drop.

``store`` sends at once (OpenIM keeps persistent notifications for sync) —
except where OpenIM keeps nothing: released v3.8.x sends every business
notification online-only, so there a persistent notification-mode type is
held like ``hold`` while the user is offline (see openim/release.py).
``hold`` keeps the recipient ``held`` while the user is offline: a user.online
callback makes it due at once, and it is rechecked every
``delivery.hold_recheck_seconds`` until its TTL in case that callback was
lost. ``drop`` skips users who are offline at send time.

Offline means no connection that online push reaches: OpenIM's gateway skips
iOS connections whose app is in the background (``hub_server.go``). Presence
comes from OpenIM's callbacks, which are lossy periodic level reports, and
going to the background fires none: when what they said is older than
``delivery.presence_max_age_seconds`` (or the TTL is close), or when they say
"online" for an online-only send (nothing keeps it if the app is not
reached), OpenIM's ``/user/get_users_online_status`` decides instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import Config
from ..openim.client import OpenIMClient, OpenIMError
from ..openim.release import OpenIMRelease
from ..store.base import Outcome, Store, WorkItem

Record = Callable[[WorkItem, Outcome], None]
Decide = Callable[[WorkItem, OpenIMError], Outcome]


class OfflinePolicy:
    """Decides, per leased user recipient, whether it goes out now."""

    def __init__(self, config: Config, store: Store, openim: OpenIMClient, release: OpenIMRelease,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = config.delivery
        self.store, self.openim, self.release, self.clock = store, openim, release, clock

    def apply(self, items: list[WorkItem], decide: Decide, record: Record) -> list[WorkItem]:
        """Record held/skipped outcomes for offline users; return the items to send now."""
        policies = {id(i): self._policy(i) for i in items if i.kind == "user"}
        waiting = [i for i in items if policies.get(id(i)) in ("hold", "drop")]
        if not waiting:
            return items
        try:
            online = self._online({i.target for i in waiting},
                                  near_end={i.target for i in waiting if self._near_end(i)},
                                  online_only={i.target for i in waiting if self._online_only(i)})
        except OpenIMError as error:
            for item in waiting:
                record(item, decide(item, error))
            return [i for i in items if policies.get(id(i)) not in ("hold", "drop")]
        now_ms = self._now_ms()
        send_now = []
        for item in items:
            policy = policies.get(id(item))
            if policy not in ("hold", "drop") or online.get(item.target, False):
                send_now.append(item)
            elif policy == "drop":
                record(item, Outcome.skipped("user offline at send time (offline = drop)"))
            else:
                recheck = min(now_ms + int(self.settings.hold_recheck_seconds * 1000), item.expires_ms)
                record(item, Outcome.held(self._held_reason(item), recheck))
        return send_now

    def _policy(self, item: WorkItem) -> str:
        """The item's offline policy as it applies on this OpenIM release."""
        if item.offline == "store" and item.delivery.get("persistent") and self._online_only(item):
            return "hold"  # OpenIM would push it to no one and keep nothing: the sidecar keeps it
        return item.offline

    def _online_only(self, item: WorkItem) -> bool:
        """Whether OpenIM delivers *item* only to apps connected when it is sent: a business
        notification, unless persistent on a release that stores it (custom messages are stored)."""
        return item.mode == "notification" and not (item.delivery.get("persistent")
                                                    and self.release.stores_notifications)

    def _held_reason(self, item: WorkItem) -> str:
        if item.offline == "store":
            return (f"user offline; OpenIM {self.release.value or '(release not known yet)'} keeps no business"
                    " notification for offline apps: held until they come online")
        return "user offline; held until they come online"

    def _online(self, users: set[str], near_end: set[str], online_only: set[str]) -> dict[str, bool]:
        """Callback presence where fresh; OpenIM's live view for the rest, for users near their
        TTL, and for online-only sends the callbacks call online (they miss background switches)."""
        known = self.store.presence(sorted(users))
        oldest_ms = self._now_ms() - int(self.settings.presence_max_age_seconds * 1000)
        online = {u: state.online for u, state in known.items() if state.updated_ms >= oldest_ms}
        ask = sorted((users - online.keys()) | near_end | {u for u in online_only if online.get(u)})
        if ask:
            live = self.openim.users_online(ask)
            online.update({u: bool(live.get(u)) for u in ask})
        return online

    def _near_end(self, item: WorkItem) -> bool:
        # the last recheck before the TTL asks OpenIM: a lost online callback must not cost the message
        return item.expires_ms - self._now_ms() <= self.settings.hold_recheck_seconds * 1000

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)
