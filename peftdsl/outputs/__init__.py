"""The output wing: adapter directories, merged models, and the atomic writes under both."""
