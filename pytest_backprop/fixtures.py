"""The kit's fixtures: the lecture's data, parameters, batch and forward pass with true gradients.

Available whenever the plugin is installed (no ``--backprop`` needed); torch is imported only when
a test asks for one of them. Override any of them in a ``conftest.py`` (e.g. another config or
names file) and the fixtures that depend on it follow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import pytest

from . import options

if TYPE_CHECKING:
    from .grading.student import Student


class Batch(NamedTuple):
    """A minibatch: contexts ``Xb`` (n, block_size), targets ``Yb`` (n,), and ``n``."""

    Xb: Any
    Yb: Any
    n: int


@pytest.fixture(scope="session")
def makemore_config():
    """The network's sizes and seed: :class:`reference_model.model.Config` (the lecture's by default).

    Override it to test another network::

        # conftest.py
        @pytest.fixture(scope="session")
        def makemore_config():
            from reference_model.model import Config
            return Config(n_hidden=200, batch_size=16)
    """
    from reference_model.model import Config

    return Config()


@pytest.fixture(scope="session")
def makemore_words(request: pytest.FixtureRequest):
    """The words: ``--backprop-names`` (or ini ``backprop_names``), else ``names.txt`` in the rootdir,
    else the embedded census names. A :class:`reference_model.data.Words` (``.words``, ``.source``).

    Example::

        def test_enough_words(makemore_words):
            assert len(makemore_words) > 1000
    """
    from reference_model.data import load_words

    names = options.get(request.config, "names")
    default = Path(request.config.rootpath) / "names.txt"
    if names is None and default.is_file():
        names = str(default)
    return load_words(names)


@pytest.fixture(scope="session")
def makemore_dataset(makemore_words, makemore_config):
    """The lecture's 80/10/10 split of ``makemore_words``: a :class:`reference_model.data.Dataset`.

    Example::

        def test_split(makemore_dataset):
            assert makemore_dataset.Xtr.shape[1] == 3
    """
    from reference_model.data import build_splits

    return build_splits(makemore_words, makemore_config.block_size)


def _params_and_batch(config, dataset):
    from reference_model.model import lecture_params_and_batch

    return lecture_params_and_batch(dataset.Xtr, dataset.Ytr, config.with_(vocab_size=dataset.vocab_size))


@pytest.fixture
def makemore_params(makemore_config, makemore_dataset) -> dict:
    """Fresh parameters ``{C, W1, b1, W2, b2, bngain, bnbias}`` drawn as the lecture draws them
    (bngain and bnbias from the seeded generator too). A new copy for every test.

    Example::

        def test_param_count(makemore_params):
            assert sum(p.numel() for p in makemore_params.values()) == 4137
    """
    params, _, _ = _params_and_batch(makemore_config, makemore_dataset)
    return params


@pytest.fixture
def makemore_batch(makemore_config, makemore_dataset) -> Batch:
    """The lecture's minibatch, drawn from the generator after the parameters: ``Batch(Xb, Yb, n)``.

    Example::

        def test_batch(makemore_batch):
            Xb, Yb, n = makemore_batch
            assert Xb.shape == (n, 3)
    """
    _, Xb, Yb = _params_and_batch(makemore_config, makemore_dataset)
    return Batch(Xb, Yb, int(Xb.shape[0]))


@pytest.fixture
def makemore_forward(request: pytest.FixtureRequest, makemore_config, makemore_dataset, makemore_params, makemore_batch):
    """The expanded forward pass on the batch, every tensor detached, with autograd's true gradients.

    Returns a :class:`pytest_backprop.problem.Problem`: ``f["counts"]`` is the forward value (its
    ``.grad`` holds the truth, as in the lecture's ``cmp``), ``f.grads["counts"]`` the true gradient,
    ``f.cache()`` fresh copies of everything, ``f.n``, ``f.Xb``, ``f.Yb``. The dtype follows
    ``--backprop-dtype`` (float32 by default).

    Example::

        from pytest_backprop import assert_grad_matches

        def test_dlogprobs(makemore_forward):
            f = makemore_forward
            dlogprobs = torch.zeros_like(f["logprobs"])
            dlogprobs[range(f.n), f.Yb] = -1.0 / f.n
            assert_grad_matches(dlogprobs, f["logprobs"], name="logprobs")
    """
    import torch

    from .problems.instance import problem_from_batch

    dtype = getattr(torch, options.get(request.config, "dtype"))
    config = makemore_config.with_(vocab_size=makemore_dataset.vocab_size, batch_size=makemore_batch.n)
    return problem_from_batch(config, makemore_params, makemore_batch.Xb, makemore_batch.Yb, dtype=dtype)


@pytest.fixture(scope="session")
def backprop_student(pytestconfig: pytest.Config) -> Iterator["Student"]:
    """The submission named by ``--backprop-impl`` / ``backprop_impl``, loaded once per session and run
    with the kit's time limit and isolation (``--backprop-isolate``): a
    :class:`~pytest_backprop.grading.student.Student`. ``gradients(problem, *names, exercise="ex1")``
    returns its answers by tensor name on any problem; a test is skipped while a gradient it needs is
    not attempted, and fails with the student's line when their code raised, or with the reason when
    the submission cannot be loaded.

    Example::

        from pytest_backprop import assert_grad_matches

        def test_cross_entropy(backprop_student, makemore_forward):
            f = makemore_forward
            grads = backprop_student.gradients(f, "logits", "probs")
            assert_grad_matches(grads["logits"], f["logits"], name="logits")
    """
    from .grading.student import Student

    student = Student(pytestconfig)
    yield student
    student.close()
