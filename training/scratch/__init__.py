"""From scratch, proven against PyTorch (issue 12).

numpy_cnn      a CNN in NumPy alone: layers with forward and backward side by side, losses, SGD/Adam,
               training, save/load, and an MNIST IDX reader (no torch import)
torch_twin     the same architecture in torch, and the NumPy-vs-torch speed comparison
gradcheck      every NumPy layer checked in float64 against torch autograd
optimizers     Adam and AdaMax written out as torch.optim.Optimizer subclasses
numpy_cnn_run  train the NumPy CNN on real MNIST: weights, loss curve, test accuracy, speed figures
RESULTS.md     the figures measured on this project's 2-core machine, with the commands

Nothing here imports torch at package level, so `training.scratch.numpy_cnn` stays torch-free.
"""
