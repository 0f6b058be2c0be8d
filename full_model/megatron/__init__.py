"""The real Megatron-DeepSpeed: its Aurora job script (:mod:`.jobscript`), its log parser
(:mod:`.logparse`; the line's text in :mod:`.logtext`, DeepSpeed's comms table in :mod:`.commslog`), its sources and data on this machine (:mod:`.setup`), one run and its
verdict (:mod:`.run`), one rank's launch with the CPU workarounds (:mod:`.rank`); the CLI is
``python -m full_model.megatron`` (:mod:`.__main__`)."""
