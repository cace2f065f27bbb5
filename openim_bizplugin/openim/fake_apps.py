"""What each user's app receives from :class:`~.fake.FakeOpenIM`: pushes, stored messages, sync.

A test asserts what the app on a phone got, not what the API answered. Read
from open-im-server (main and v3.8.3-patch.15/16) and openim-sdk-core (main):

- **Stored or online-only** (msgtransfer ``online_history_msg_handler.go``): a
  message whose options leave ``history`` on gets the next seq of its
  conversation (``msgprocessor.GetConversationIDByMsg``: ``si_<a>_<b>`` /
  ``sg_<group>`` for chat, ``n_<a>_<b>`` / ``n_<group>`` for notifications);
  any other is pushed once with seq 0 and kept nowhere. A business
  notification is stored only on main with ``reliabilityLevel: 2``; v3.8.x
  hard-codes level 1 (``internal/api/msg.go``).
- **Conversations** (server side): the first stored chat message creates
  ``si_`` for both users; group creation sends ``groupCreated``
  (``isSendMsg: true`` in ``notification.yml``), whose chat copy creates
  ``sg_`` for the members. Notifications create none.
- **Online push** (msggateway ``hub_server.go`` ``pushToUser``): every
  connection of a recipient, except iOS (platform 1) connections whose app is
  in the background.
- **The SDK** (``internal/interaction/msg_sync.go``): a pushed seq-0 message
  is raised at once; a stored one is raised when it is the next seq, and a
  gap is pulled first. On connect (``doConnected``) and when the app comes to
  the foreground (``doWakeupDataSync``) it asks ``GetNewestSeq``, which
  reports only the user's conversations, the ``n_`` twin of each and
  ``n_<self>_<self>`` (``internal/rpc/msg/sync_msg.go`` ``GetMaxSeq``): a
  stored notification in ``n_<sender>_<user>`` is synced only when the user
  has a ``si_`` conversation with the sender. Notification conversations are
  pulled whole; chat ones only their newest 1 (connect) or 10 (wake-up,
  gaps) messages reach the listener. A device's first login (nothing local:
  ``reinstalled``) fast-forwards to the newest seqs without raising anything.

Not modelled: offline push (APNs/FCM), the chat copy of ``sendMsg: true``
notifications, history the app loads itself, pushes to the sender's devices.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

IOS = 1
CONNECT_PULL = 1   # connectPullNums: chat messages raised per conversation at connect
GAP_PULL = 10      # defaultPullNums: after a gap, and on waking up


class Message(Protocol):
    """The fields of a :class:`~.fake.Delivery` that decide where it goes."""

    session_type: int
    send_id: str
    recv_id: str
    group_id: str
    options: dict[str, bool]


def conversation_id(msg: Message) -> str:
    """msgprocessor.GetConversationIDByMsg."""
    notification = not msg.options.get("isNotNotification", True)
    if msg.session_type in (2, 3):
        return ("n_" if notification else "sg_") + msg.group_id
    pair = "_".join(sorted((msg.send_id, msg.recv_id)))
    return ("n_" if notification else "sn_" if msg.session_type == 4 else "si_") + pair


def _notification_twin(conversation: str) -> str:
    """conversationutil.GetNotificationConversationIDByConversationID."""
    return "n_" + conversation.split("_", 1)[1]


@dataclass
class _Device:
    """One app on one platform: its gateway connection and its SDK's sync state."""

    user_id: str
    platform_id: int
    conn_id: str = ""
    token: str = ""
    connected: bool = False
    background: bool = False
    installed: bool = False                                  # logged in here before
    synced: dict[str, int] = field(default_factory=dict)     # the SDK's syncedMaxSeqs
    received: list[Any] = field(default_factory=list)        # what its listeners raised, in order

    @property
    def reached_by_push(self) -> bool:
        return self.connected and not (self.background and self.platform_id == IOS)


class Apps:
    """The devices of every user, the stored conversations and what each app received."""

    def __init__(self) -> None:
        self._devices: defaultdict[str, dict[int, _Device]] = defaultdict(dict)
        self._stored: defaultdict[str, list[Any]] = defaultdict(list)
        self._conversations: defaultdict[str, set[str]] = defaultdict(set)

    # -- the gateway -------------------------------------------------------------------
    def connections(self, user_id: str) -> list[dict[str, Any]]:
        """What ``/user/get_users_online_status`` reports per connection."""
        return [{"platformID": d.platform_id, "connID": d.conn_id, "isBackground": d.background, "token": d.token}
                for d in self._devices.get(user_id, {}).values() if d.connected]

    def connect(self, user_id: str, platform_id: int, token: str, *, background: bool = False) -> None:
        """The app logs in (a new connection replaces one on the same platform) and syncs."""
        device = self._devices[user_id].setdefault(platform_id, _Device(user_id, platform_id))
        device.connected, device.background = True, background
        device.conn_id, device.token = uuid.uuid4().hex, token
        self._sync(device, CONNECT_PULL)

    def disconnect(self, user_id: str, platform_id: int) -> None:
        device = self._devices.get(user_id, {}).get(platform_id)
        if device is not None:
            device.connected = False

    def set_background(self, user_id: str, platform_id: int, background: bool) -> None:
        """SetAppBackgroundStatus; back in the foreground the SDK syncs (no callback either way)."""
        device = self._devices.get(user_id, {}).get(platform_id)
        if device is None or not device.connected:
            raise ValueError(f"{user_id} is not connected on platform {platform_id}")
        was_background, device.background = device.background, background
        if was_background and not background:
            self._sync(device, GAP_PULL)

    def join(self, conversation: str, user_ids: list[str]) -> None:
        for user_id in user_ids:
            self._conversations[user_id].add(conversation)

    def received(self, user_id: str, platform_id: int | None = None) -> list[Any]:
        devices = self._devices.get(user_id, {})
        chosen = devices.values() if platform_id is None else [d for p, d in devices.items() if p == platform_id]
        return [msg for device in chosen for msg in device.received]

    # -- a message OpenIM accepted ---------------------------------------------------------
    def route(self, msg: Message, recipients: list[str]) -> int:
        """Store *msg* if its options say so, then push it to the recipients' devices; returns
        its seq in its conversation (0: not stored)."""
        conversation, seq = conversation_id(msg), 0
        if msg.options.get("history", True):
            self._stored[conversation].append(msg)
            seq = len(self._stored[conversation])
            if not conversation.startswith("n_"):
                self.join(conversation, [msg.send_id, msg.recv_id] if msg.session_type == 1 else recipients)
        for user_id in recipients:
            for device in self._devices.get(user_id, {}).values():
                if device.reached_by_push:
                    self._push(device, conversation, msg, seq)
        if seq:  # the sending app knows its own message: its seq is no gap, and it raises nothing
            for device in self._devices.get(msg.send_id, {}).values():
                if device.connected and msg.send_id not in recipients:
                    self._push(device, conversation, None, seq)
        return seq

    def _push(self, device: _Device, conversation: str, msg: Message | None, seq: int) -> None:
        """pushTriggerAndSync: raise the next seq; after a gap, pull up to it (*msg* None: the
        device's own message, raised by nobody)."""
        synced = device.synced.get(conversation, 0)
        if seq == 0 and msg is not None:
            device.received.append(msg)
        elif seq == synced + 1 and msg is not None:
            device.received.append(msg)
        elif seq > synced + 1:
            self._pull(device, conversation, synced + 1, seq if msg is not None else seq - 1, GAP_PULL)
        if seq > synced:
            device.synced[conversation] = seq

    def _sync(self, device: _Device, pull: int) -> None:
        """doConnected / doWakeupDataSync: GetMaxSeq, then pull what is newer than synced."""
        own = self._conversations[device.user_id]
        reported = own | {_notification_twin(c) for c in own} | {f"n_{device.user_id}_{device.user_id}"}
        for conversation in sorted(reported):
            newest = len(self._stored.get(conversation, ()))
            if not device.installed:      # first login: fast-forward, raise nothing
                device.synced[conversation] = max(newest, device.synced.get(conversation, 0))
            elif newest > device.synced.get(conversation, 0):
                self._pull(device, conversation, device.synced.get(conversation, 0) + 1, newest, pull)
        device.installed = True

    def _pull(self, device: _Device, conversation: str, first: int, last: int, pull: int) -> None:
        messages = self._stored[conversation][first - 1:last]
        if not conversation.startswith("n_"):   # notification conversations ignore the pull limit
            messages = messages[-pull:]
        device.received.extend(messages)
        device.synced[conversation] = last
