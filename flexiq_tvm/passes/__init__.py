"""Relax passes, one rewrite per file."""
