"""The network: layers, methods (edge-popup and the others; reference.py is the algorithm on one
screen), the model built from them, optimizers. Array code written once against `xp`."""
