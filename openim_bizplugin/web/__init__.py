"""The HTTP edge: app factory, views, callback endpoint, operator page and the server."""

from .plugin import BizPlugin

__all__ = ["BizPlugin"]
