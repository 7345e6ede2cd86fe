"""The foreign bench: independently written training scripts, never used to fit or tune
anything, scored with their own loss logs as truth (docs/foreign.md)."""
