"""Offline policies for user recipients (SPEC §4, §5): store, hold, drop.

``store`` sends at once, except a persistent notification-mode type, which is
held like ``hold`` while the user is offline on every OpenIM release: an app
gets a business notification only when online push reaches it. Released
v3.8.x keeps none (see openim/release.py). Main stores it (reliabilityLevel 2,
still sent) but a reconnecting app syncs ``n_<sender>_<user>`` only when the
user has a chat with the sender, and a device's first login skips everything
stored before (``sync_msg.go`` ``GetMaxSeq``, the SDK's ``msg_sync.go``).
Group targets are not held: one notification goes to the group
(``recvGroupID``) on main, or to each member on v3.8.x.
``hold`` keeps the recipient ``held`` while the user is offline: a user.online
callback makes it due at once, and it is rechecked every
``delivery.hold_recheck_seconds`` until its TTL in case that callback was
lost. ``drop`` skips users who are offline at send time.

Offline means no connection that online push reaches: OpenIM's gateway skips
iOS connections whose app is in the background (``hub_server.go``). Presence
comes from OpenIM's callbacks, which are lossy periodic level reports, and
going to the background fires none: when what they said is older than
``delivery.presence_max_age_seconds`` (or the TTL is close), or when they say
"online" for a business notification (the app gets it only if it is reached
now), OpenIM's ``/user/get_users_online_status`` decides instead.
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
        """The item's offline policy as it applies to what the app receives."""
        if item.offline == "store" and item.delivery.get("persistent") and self._online_only(item):
            return "hold"  # the app would get it only if online now: the sidecar keeps it until then
        return item.offline

    @staticmethod
    def _online_only(item: WorkItem) -> bool:
        """Whether the app gets *item* only if online push reaches it when it is sent: any
        business notification, even one OpenIM main stores (see the module docstring); custom
        messages are chat messages, synced on reconnect."""
        return item.mode == "notification"

    def _held_reason(self, item: WorkItem) -> str:
        if item.offline != "store":
            return "user offline; held until they come online"
        if self.release.stores_notifications:
            why = "main stores it, but a reconnecting app syncs it only after a chat with the sender"
        else:
            release = self.release.value or "(release not known yet)"
            why = f"{release} keeps no business notification for offline apps"
        return f"user offline; OpenIM {why}: held until they come online"

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
