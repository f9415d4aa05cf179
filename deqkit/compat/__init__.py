"""Compatibility layers: other libraries' APIs on top of deqkit.

``deqkit.compat.torchdeq`` runs code written for torchdeq 0.1.0 after an import change only.
"""
