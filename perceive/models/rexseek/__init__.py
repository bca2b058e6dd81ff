"""RexSeek (IDEA-Research/RexSeek): the released RexSeek-3B folder, loaded and run in pure PyTorch.

A Qwen2.5 language model answers with object indices over boxes a detector gives it; each box becomes one
object token from a CLIP ViT-L/14-336 and a ConvNeXt-L tower. ``RexSeekPerceiver`` loads the folder as released
(``config.json`` with ``model_type`` "rexseek_qwen", sharded safetensors, the Qwen tokenizer and its 104 added
tokens) and never runs the folder's own code.
"""
