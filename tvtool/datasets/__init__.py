"""Data sets: image folders and other sources, splits, transforms, the built-in registry.

Kept import-light (no torch at package import) so the CLI can list the registry quickly.
"""
