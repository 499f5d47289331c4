"""medfound: train medical-imaging AI across imaging centers without moving their images."""

__version__ = "0.1.0"
