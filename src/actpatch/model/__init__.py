"""The model layer: loading (hub, local, GGUF, bundled), one declarative adapter per architecture, device placement."""
