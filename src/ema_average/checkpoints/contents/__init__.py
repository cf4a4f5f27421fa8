"""What a checkpoint holds, decided by structure: the model's weights told apart from optimizer state,
schedulers, trainer state and averaged copies; the trainer vocabulary, used as hints."""
