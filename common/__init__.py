"""The contract every side shares: event schema and loaders, sessions, behaviour tokens, features."""
