# A backward pass for two_layer_relu.py with two classic mistakes (see the comments).
import torch
import torch.nn.functional as F

dlogp = torch.zeros_like(logp)
dlogp[range(n), y] = -1.0 / n
desum = -dlogp.sum(1, keepdim=True) / esum
de = torch.ones_like(e) * desum
dshifted = dlogp.clone()
dshifted += e * de
dzmax = -dshifted.sum(1, keepdim=True)
dz2 = dshifted.clone()
dz2 += F.one_hot(z2.argmax(1), num_classes=z2.shape[1]) * dzmax
da1 = dz2 @ W2.T
dW2 = a1.T @ dz2
db2 = dz2.sum(0, keepdim=True)  # mistake: keepdim gives (1, c) for b2's (c,)
dz1 = da1  # mistake: forgot the ReLU's mask, (z1 > 0) * da1
dx = dz1 @ W1.T
dW1 = x.T @ dz1
db1 = dz1.sum(0)
