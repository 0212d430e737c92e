"""The ground floor every other package builds on: user errors, files written atomically,
JSONL, and the base class of every params section. It imports nothing from the project."""
