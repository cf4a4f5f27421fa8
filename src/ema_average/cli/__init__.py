"""The command line: the app (:mod:`.app`), its options declared once (:mod:`.options`) and what it prints
(:mod:`.report`, :mod:`.posthoc`). Torch-free until a run starts, so ``--help`` answers quickly."""
