"""openim-bizplugin: a sidecar that delivers signed, schema-checked business
control messages through OpenIM Server and tracks what happened to them."""

__version__ = "0.1.0"
