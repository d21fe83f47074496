"""PyTorch interop: the parameter-name mapping (`layout`), loading (`loading`), conversion."""
