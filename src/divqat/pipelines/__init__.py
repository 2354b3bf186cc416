"""The drivers: the only code that wires a victim, a defense, the black box and an attack
together, reads datasets for them and writes their metrics files.

- ``train``: data -> fp32 teacher, or teacher -> QAT / DivQAT int8 victim (``divqat train``).
- ``defense_models``: a defense for a saved victim, with the model it runs, if any.
- ``defend``: what a defense costs and changes, measured on a saved victim (``divqat defend``).
- ``attack``: an extraction attack against a saved victim behind a defense, measured
  (``divqat attack``).
- ``export``: a victim as an ExecuTorch ``.pte`` device program, a formula defense inside,
  optionally sealed (``divqat export``).
- ``device_copy``: the on-device thief who copies the program file (``divqat attack --attack copy``).
"""
