"""Other implementations' checkpoints: :mod:`.fairseq` loads the official data2vec 2.0 checkpoints."""
