"""repa-zoo: a shared flow-matching core with hooks, and the REPA family of methods on top of it."""
__version__ = "0.1.0"
