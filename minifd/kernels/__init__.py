"""The hot spots of the decoder: attention and linear layers.

Each seam (`attention.py`, `linear.py`) takes arrays of the model's array module and routes them to
a CUDA/HIP kernel on GPU or to a NumPy emulation that blocks the work the same way on CPU.
"""
