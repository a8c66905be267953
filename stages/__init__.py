"""The MNIST pipeline's stages (prepare, split, train, evaluate) and the modules they share."""

import os

# Keep TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) out of the stage logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
