"""Finding one training run's checkpoints in a folder tree: the units layouts claim, the step of each, the
side files and copies set apart, and the checks that they agree."""
