"""Retention of local spool files (moved here from segments)."""

from .segments import prune

__all__ = ("prune",)
