"""What OpenIM's callbacks change, and the events that reach subscribers."""
