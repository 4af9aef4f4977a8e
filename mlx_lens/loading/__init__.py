"""Where a model comes from and where it runs: model sources (folder, GGUF, hub id), the packaged
default model, device and dtype placement."""
