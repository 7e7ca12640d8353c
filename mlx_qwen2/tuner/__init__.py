"""Fine-tuning as a library: adapters, data, the training loop, checkpoints. No argument parsing, no printing."""
