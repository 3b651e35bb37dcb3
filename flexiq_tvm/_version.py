"""The release number (its own module: the package root imports api, so api cannot import the root)."""
__version__ = "0.1.0"
