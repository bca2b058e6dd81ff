"""MVP-LM: a ``<PER>`` token drives one box-and-mask query decoder (mvp-lm.txt)."""
