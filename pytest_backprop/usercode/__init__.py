"""Running a user's backward pass: scripts, modules, per-line functions and notebooks, each run in a
fresh namespace on copies of a problem's forward values, in-process or isolated in a child process.
This layer produces gradients (:class:`~pytest_backprop.usercode.base.RunResult`); it judges nothing."""
