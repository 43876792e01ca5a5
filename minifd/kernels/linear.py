"""Linear-layer seam: y = x @ W^T with W stored as Hugging Face stores it (row n = output n)."""


def linear(x, weight):
    """x: [M, K]; weight: [N, K] -> [M, N]"""
    return x @ weight.T
