"""The stages: one thin command-line module each (``python -m arcfold <stage>``): parse the arguments, call the
library, write files. The layers below know nothing of the command line.

Imports are deferred on purpose here, and only here: each ``main`` imports its library (torch, timm, faiss, ...)
after its arguments are parsed, so ``--help`` and argument errors answer without loading them; the few library
constants a parser needs (``choices``, defaults) are restated in the stage, and tests/stages/test_cli_help.py checks
that they equal the library's and that no stage's ``--help`` imports torch, timm, faiss, pandas or optuna.
"""
