"""deepspec: speculative-decoding draft models (Eagle3, DFlash, DSpark), trained, evaluated and kept healthy."""

__version__ = "0.1.0"
