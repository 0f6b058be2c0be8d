"""The project's own 3D-parallel training step: the model (``model``), its TP/PP/DP pieces
(``parallel``), the 1F1B schedule (``schedule``) and one run of it (``step``); the command
line is ``python -m full_model.train``."""

PROBE = "full_model.train"
"""The command that runs the reference step: its rows and manifests are named for it."""
