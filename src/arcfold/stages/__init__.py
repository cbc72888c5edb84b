"""The stages: one thin command-line module each (``python -m arcfold <stage>``): parse the arguments, call the
library, write files. The layers below know nothing of the command line.

Imports are deferred on purpose here, and only here: each ``main`` imports its library (torch, timm, faiss, ...)
after its arguments are parsed, so ``--help`` and argument errors answer without loading them.
"""
