"""The catalogue of message types: versioned schemas, bounded validation, check and docs."""
