"""The crash-consistency harness: kill and power-loss campaigns against checkpointers."""
