"""Differential fuzzing: random cases run on two backends, compared, shrunk.

`python -m harness fuzz` (and `make fuzz`) draws cases (generate), runs each
on the engine and on real QEMU and compares everything the two runs leave
behind (compare), shrinks a disagreement to a minimal case (shrink) and
writes it as a ready-to-commit case file with a golden blessed by QEMU
(findings). The command line and its report are in harness.fuzz.cli.
"""
