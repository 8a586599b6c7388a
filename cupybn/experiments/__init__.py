"""The paper's experiments, small enough for a CPU, one module each.

``data``      the data sets they share (scikit-learn's 8x8 digits, MNIST files)
``figure1``   Figure 1: a fully connected sigmoid network with and without BN
"""
