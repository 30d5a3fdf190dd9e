"""Draft models (Eagle3, DFlash, DSpark) and their inference protocol (``base``)."""
