"""The drivers: the only code that wires a victim, a defense, the black box and an attack
together, reads datasets for them and writes their metrics files.

Each driver takes a request (what to do, e.g. ``AttackRequest``) and a ``RunContext`` (where the
data are, the device, progress bars, the log: ``context``); where an experiment's stage worker
already holds the loaded objects, a second entry takes them (``attack_loaded``,
``calibrate_loaded``).

- ``train``: data -> fp32 teacher, or teacher -> QAT / DivQAT int8 victim (``divqat train``).
- ``defense_models``: a defense for a saved victim, with the model it runs, if any.
- ``defend``: what a defense costs and changes, measured on a saved victim (``divqat defend``).
- ``attack``: an extraction attack against a saved victim behind a defense, measured
  (``divqat attack``).
- ``export``: a victim as an ExecuTorch ``.pte`` device program, a formula defense inside,
  optionally sealed (``divqat export``).
- ``device_copy``: the on-device thief who copies the program file (``divqat attack --attack copy``).
- ``detect``: extraction detectors on a saved victim: calibrated, and measured against the thieves
  (``divqat calibrate``, ``divqat detect``).
- ``stages``: the work of one experiment stage, reusing what consecutive stages share.
"""
