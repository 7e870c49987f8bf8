"""graphsparse: post-training activation surgery (MeanSparse, SPARTA) for robust image classifiers."""

__version__ = "0.1.0"
