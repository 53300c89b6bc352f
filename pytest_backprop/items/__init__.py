"""The pytest items ``--backprop`` collects under ``backprop::`` (gradients, properties, Exercise 4)."""
