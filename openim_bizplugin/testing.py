"""Test helpers for integrations: :class:`FakeOpenIM`, a loopback OpenIM server.

The public face of :mod:`openim_bizplugin.openim.fake`; see its docstring for an example.
"""

from .openim.fake import Call, Delivery, FakeOpenIM

__all__ = ["Call", "Delivery", "FakeOpenIM"]
