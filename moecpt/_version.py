"""The package version, in a module of its own so that any layer can read it without importing the ``moecpt``
facade (whose :func:`moecpt.load_model` reaches the top layers; docs/design.md, rule A2)."""

__version__ = "0.1.0"
