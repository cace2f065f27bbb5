"""Which OpenIM API the sidecar talks to: a released v3.8.x or main (SPEC §5).

They differ where the sidecar's promises depend on it (read in
open-im-server's ``internal/api/msg.go``, ``SendBusinessNotification``):

- every released v3.8.x (v3.8.0 to v3.8.3-patch.16; openim-docker runs
  v3.8.3-patch.15) takes ``recvUserID`` only (``binding:"required"``) and
  hard-codes the options to reliability level 1: a business notification is
  pushed to the apps online at that moment and kept nowhere;
- main (and v3.8.4-alpha.1) takes ``recvGroupID`` too and stores a
  notification sent with ``reliabilityLevel: 2`` (which an app that was
  offline does not always sync: the sidecar holds persistent ones for offline
  users on both, see delivery/offline.py).

A probe that sends nothing tells them apart: ``send_business_notification``
with neither ``recvUserID`` nor ``recvGroupID``. v3.8.x fails gin's binding on
``RecvUserID`` (HTTP 400, errCode 1001); main answers 1001 "recvUserID and
recvGroupID cannot be empty at the same time". Both answer before the admin
check, so nothing is sent. ``[openim] version`` set to "3.8" or "main" skips
the probe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..config import OPENIM_VERSIONS
from .client import OpenIMClient, OpenIMError

log = logging.getLogger(__name__)

VERSIONS = OPENIM_VERSIONS  # "auto", then the releases:
V38, MAIN = VERSIONS[1:]
PROBE_ENDPOINT = "/msg/send_business_notification"
PROBE_RETRY_SECONDS = 30.0  # after a probe that could not tell (OpenIM down, token refused)


def release_in(error: OpenIMError) -> str | None:
    """The release a refused ``send_business_notification`` gives away, or None."""
    text = f"{error.err_msg} {error.err_dlt}"
    if error.err_code != 1001:
        return None
    if "'RecvUserID' failed on the 'required' tag" in text:
        return V38
    if "recvUserID and recvGroupID cannot be empty" in text:
        return MAIN
    return None


class OpenIMRelease:
    """The release in use: configured, or detected by the probe once per process.

    Until it is known (OpenIM unreachable at start), :meth:`get` probes again at
    most every ``retry_seconds``; meanwhile a group notification goes with
    ``recvGroupID``, and a v3.8.x refusal of it gives the release away (:meth:`learn`).
    """

    def __init__(self, openim: OpenIMClient, configured: str, sender_id: str, *,
                 clock: Callable[[], float] = time.time, retry_seconds: float = PROBE_RETRY_SECONDS) -> None:
        if configured not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, not {configured!r}")
        self.openim, self.sender_id, self.clock, self.retry_seconds = openim, sender_id, clock, retry_seconds
        self.value: str | None = None if configured == "auto" else configured
        self.source = "detected" if configured == "auto" else "configured"
        self.problem: str | None = None
        self._next_probe = 0.0
        self._lock = threading.Lock()

    def get(self) -> str | None:
        """The release, probing OpenIM first when it is not known yet."""
        if self.value is not None or self.clock() < self._next_probe:
            return self.value
        with self._lock:  # one probe at a time; the others take its answer
            if self.value is None and self.clock() >= self._next_probe:
                self._probe()
        return self.value

    @property
    def stores_notifications(self) -> bool:
        """Whether OpenIM keeps a reliabilityLevel 2 notification for an app that is offline."""
        return self.get() == MAIN

    def learn(self, error: OpenIMError) -> bool:
        """A send's answer gave the release away (a v3.8.x binding error on a group target):
        True when that changed what is known. OpenIM's answer beats the config."""
        found = release_in(error)
        if found is None or found == self.value:
            return False
        log.warning("OpenIM answers as %s, not %s (%s): switching", found, self.value or "unknown", self.source,
                    extra={"event": "openim.release", "release": found})
        self.value, self.source, self.problem = found, "detected", None
        return True

    def describe(self) -> str:
        """One line for doctor and /readyz: "3.8 (detected)", "main (configured)", "unknown (…)"."""
        if self.value is not None:
            return f"{self.value} ({self.source})"
        return f"unknown ({self.problem or 'not probed yet'})"

    def _probe(self) -> None:
        operation_id = self.openim.new_operation_id("release-probe")
        try:
            self.openim.call(PROBE_ENDPOINT, {"sendUserID": self.sender_id}, operation_id=operation_id)
        except OpenIMError as error:
            found = release_in(error)
            if found is not None:
                self.value, self.problem = found, None
                log.info("OpenIM release: %s (detected, operationID %s)", found, operation_id,
                         extra={"event": "openim.release", "release": found, "operation_id": operation_id})
                return
            self.problem = f"probe failed: {error}"
        else:
            self.problem = "probe failed: OpenIM accepted a notification without a recipient"
        self._next_probe = self.clock() + self.retry_seconds
        log.warning("OpenIM release not known yet: %s", self.problem, extra={"event": "openim.release_unknown"})
