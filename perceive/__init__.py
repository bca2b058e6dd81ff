"""perceive: perception MLLMs that understand an image and point at exact objects in it."""

__version__ = "0.1.0"
