"""Worked examples built on deqkit (not part of the installed package)."""
