"""The lecture's MLP ("makemore part 4: becoming a backprop ninja"), its data and reference solutions.

Modules:

- :mod:`reference_model.data`     -- words, vocabulary, ``build_dataset`` and the 80/10/10 split.
- :mod:`reference_model.model`    -- configuration, parameters, the expanded forward pass as a table
  of its 20 lines, the fused forward, and the autograd ground truth.
- :mod:`reference_model.backward` -- reference backward passes (Exercises 1-4).
- :mod:`reference_model.train`    -- Exercise 4: training with the manual backward.

Importing this package imports nothing heavy; the submodules import torch.
"""
