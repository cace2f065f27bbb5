"""OpenIM Server: the REST client with its admin token, and a loopback fake for tests."""
