"""Post-hoc EMA (Karras et al., EDM2, 2024): choose a power-function EMA's width after training.

Two (or more) power-function EMAs are kept while training and snapshotted every few hundred or thousand
steps; afterwards the EMA of any other ``sigma_rel`` at any snapshot step is a least-squares combination
of the snapshots. One module per job: ``profiles`` (the float64 math: inner products, the solve, the fit),
``snapshots`` (finding and checking a folder of snapshots: this tool's, ema-pytorch's), ``job`` (the
offline reconstruction, streamed through the pipeline), ``training`` (writing snapshots while training).
Kept light: importing the package imports none of them.
"""
