"""open_clip as the project uses it: the model factory, model ids, local architectures and checkpoints."""
