"""Executors: the in-process reference (``local``) and the Ray driver (``ray``)."""
