"""The trainer: reads MNIST, trains a Keras classifier from a named preset and publishes it as a
new version in the model repository (``mnist-train``); TensorFlow is imported only when training."""
