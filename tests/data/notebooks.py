"""Real-looking student notebooks for the tests, built with nbformat (nothing here is run at import).

``lecture_notebook()`` is a filled-in notebook in the lecture's layout: imports and data download,
dataset, initialisation, the forward pass with ``loss.backward()``, Exercise 1 (with the student's
cmp calls), Exercise 2, Exercise 3, training, calibration and plotting cells. The other builders
are variants real students wrote. ``write(nb, path)`` saves one.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SETUP = """\
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt # for making figures
%matplotlib inline"""

DOWNLOAD = "!wget https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"

DATA = """\
words = open('names.txt', 'r').read().splitlines()
print(len(words))
chars = sorted(list(set(''.join(words))))
stoi = {s:i+1 for i,s in enumerate(chars)}
stoi['.'] = 0
itos = {i:s for s,i in stoi.items()}
vocab_size = len(itos)
block_size = 3
def build_dataset(words):
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + '.':
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(X), torch.tensor(Y)
Xtr, Ytr = build_dataset(words)"""

CMP_DEF = """\
def cmp(s, dt, t):
    ex = torch.all(dt == t.grad).item()
    app = torch.allclose(dt, t.grad)
    maxdiff = (dt - t.grad).abs().max().item()
    print(f'{s:15s} | exact: {str(ex):5s} | approximate: {str(app):5s} | maxdiff: {maxdiff}')"""

INIT = """\
n_embd = 10
n_hidden = 64
g = torch.Generator().manual_seed(2147483647)
C  = torch.randn((vocab_size, n_embd), generator=g)
W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * (5/3)/((n_embd * block_size)**0.5)
b1 = torch.randn(n_hidden, generator=g) * 0.1
W2 = torch.randn((n_hidden, vocab_size), generator=g) * 0.1
b2 = torch.randn(vocab_size, generator=g) * 0.1
bngain = torch.randn((1, n_hidden))*0.1 + 1.0
bnbias = torch.randn((1, n_hidden))*0.1
parameters = [C, W1, b1, W2, b2, bngain, bnbias]
for p in parameters:
    p.requires_grad = True"""

BATCH = """\
batch_size = 32
n = batch_size # a shorter variable also, for convenience
ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
Xb, Yb = Xtr[ix], Ytr[ix]"""

FORWARD = """\
emb = C[Xb]
embcat = emb.view(emb.shape[0], -1)
hprebn = embcat @ W1 + b1
bnmeani = 1/n*hprebn.sum(0, keepdim=True)
bndiff = hprebn - bnmeani
bndiff2 = bndiff**2
bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)
bnvar_inv = (bnvar + 1e-5)**-0.5
bnraw = bndiff * bnvar_inv
hpreact = bngain * bnraw + bnbias
h = torch.tanh(hpreact)
logits = h @ W2 + b2
logit_maxes = logits.max(1, keepdim=True).values
norm_logits = logits - logit_maxes
counts = norm_logits.exp()
counts_sum = counts.sum(1, keepdims=True)
counts_sum_inv = counts_sum**-1
probs = counts * counts_sum_inv
logprobs = probs.log()
loss = -logprobs[range(n), Yb].mean()
for p in parameters:
    p.grad = None
for t in [logprobs, probs, counts, counts_sum, counts_sum_inv, norm_logits, logit_maxes, logits, h, hpreact,
          bnraw, bnvar_inv, bnvar, bndiff2, bndiff, hprebn, bnmeani, embcat, emb]:
    t.retain_grad()
loss.backward()
loss"""

EX1 = """\
# Exercise 1: backprop through the whole thing manually
dlogprobs = torch.zeros_like(logprobs)
dlogprobs[range(n), Yb] = -1.0/n
dprobs = (1.0 / probs) * dlogprobs
dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
dcounts = counts_sum_inv * dprobs
dcounts_sum = (-counts_sum**-2) * dcounts_sum_inv
dcounts += torch.ones_like(counts) * dcounts_sum
dnorm_logits = counts * dcounts
dlogits = dnorm_logits.clone()
dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
dh = dlogits @ W2.T
dW2 = h.T @ dlogits
db2 = dlogits.sum(0)
dhpreact = (1.0 - h**2) * dh
dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
dbnraw = bngain * dhpreact
dbnbias = dhpreact.sum(0, keepdim=True)
dbndiff = bnvar_inv * dbnraw
dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
dbnvar = (-0.5*(bnvar + 1e-5)**-1.5) * dbnvar_inv
dbndiff2 = (1.0/(n-1))*torch.ones_like(bndiff2) * dbnvar
dbndiff += (2*bndiff) * dbndiff2
dhprebn = dbndiff.clone()
dbnmeani = (-dbndiff).sum(0, keepdim=True)
dhprebn += 1.0/n * (torch.ones_like(hprebn) * dbnmeani)
dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
demb = dembcat.view(emb.shape)
dC = torch.zeros_like(C)
for k in range(Xb.shape[0]):
    for j in range(Xb.shape[1]):
        ix = Xb[k,j]
        dC[ix] += demb[k,j]"""

CMP_CALLS = "\n".join(f"cmp('{t}', d{t}, {t})" for t in (
    "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes", "logits", "h",
    "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff", "bnmeani",
    "hprebn", "embcat", "W1", "b1", "emb", "C"))

EX2 = """\
# Exercise 2: backprop through cross_entropy but all in one go
loss_fast = F.cross_entropy(logits, Yb)
print(loss_fast.item(), 'diff:', (loss_fast - loss).item())
dlogits = F.softmax(logits, 1)
dlogits[range(n), Yb] -= 1
dlogits /= n
cmp('logits', dlogits, logits)"""

EX3 = """\
# Exercise 3: backprop through batchnorm but all in one go
hpreact_fast = bngain * (hprebn - hprebn.mean(0, keepdim=True)) / torch.sqrt(hprebn.var(0, keepdim=True, unbiased=True) + 1e-5) + bnbias
print('max diff:', (hpreact_fast - hpreact).abs().max())
dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))
cmp('hprebn', dhprebn, hprebn)"""

TRAIN = """\
# Exercise 4: putting it all together
max_steps = 200000
lossi = []
with torch.no_grad():
    for i in range(max_steps):
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
        Xb, Yb = Xtr[ix], Ytr[ix]
        emb = C[Xb]
        logits = torch.tanh(emb.view(emb.shape[0], -1) @ W1 + b1) @ W2 + b2
        loss = F.cross_entropy(logits, Yb)
        dlogits = F.softmax(logits, 1)
        dlogits[range(n), Yb] -= 1
        dlogits /= n
        dW2 = h.T @ dlogits
        db2 = dlogits.sum(0)
        grads = [dW2, db2]
        for p, grad in zip(parameters, grads):
            p.data += -0.1 * grad
        lossi.append(loss.log10().item())
        raise RuntimeError('the training cell must never run')"""

CALIBRATE = """\
with torch.no_grad():
    emb = C[Xtr]
    hpreact = emb.view(emb.shape[0], -1) @ W1 + b1
    bnmean = hpreact.mean(0, keepdim=True)
    bnvar = hpreact.var(0, keepdim=True, unbiased=True)"""

PLOT = "plt.plot(lossi)\nraise RuntimeError('the plotting cell must never run')"


def notebook(*cells: str | tuple[str, list[str]]) -> nbformat.NotebookNode:
    """A notebook of code cells (a tuple gives (source, tags)), with a markdown title cell first."""
    nb = new_notebook()
    nb.cells.append(new_markdown_cell("# makemore: becoming a backprop ninja"))
    for cell in cells:
        source, tags = (cell, []) if isinstance(cell, str) else cell
        code = new_code_cell(source)
        if tags:
            code.metadata["tags"] = tags
        nb.cells.append(code)
    return nb


def lecture_notebook(ex1: str = EX1, cmp_calls: str = CMP_CALLS, ex2: str = EX2, ex3: str = EX3,
                     extra_before_ex1: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    """The lecture's layout, filled in. Cell positions (1-based, markdown title = 1): setup 2,
    download 3, data 4, cmp def 5, init 6, batch 7, forward 8, [extras], ex1 9, cmp calls 10,
    ex2 11, ex3 12, train 13, calibrate 14, plot 15."""
    return notebook(SETUP, DOWNLOAD, DATA, CMP_DEF, INIT, BATCH, FORWARD, *extra_before_ex1,
                    ex1 + "\n" if ex1 else "pass", cmp_calls, ex2, ex3, TRAIN, CALIBRATE, PLOT)


def renamed_notebook() -> nbformat.NotebookNode:
    """Every gradient renamed ``dL_d<name>``, checked only through the student's own cmp calls."""
    ex1 = EX1
    names = sorted(("logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
                    "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar",
                    "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C"), key=len, reverse=True)
    import re

    pattern = re.compile(r"\bd(" + "|".join(names) + r")\b")
    ex1 = pattern.sub(r"dL_d\1", ex1)
    calls = pattern.sub(r"dL_d\1", CMP_CALLS)
    return lecture_notebook(ex1=ex1, cmp_calls=calls, ex2=pattern.sub(r"dL_d\1", EX2),
                            ex3=pattern.sub(r"dL_d\1", EX3))


def write(nb: nbformat.NotebookNode, path: Path) -> Path:
    """Save ``nb`` as ``path`` (.ipynb) and return the path."""
    nbformat.write(nb, str(path))
    return path
