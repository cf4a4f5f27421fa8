"""The built-in checkpoint layouts, one module per format, registered in discovery's order."""
