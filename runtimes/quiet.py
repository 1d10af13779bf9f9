"""Keep the export tools' chatter off the progress display, and keep it for error reports."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet():
    """Silence what torch.onnx, onnxruntime's quantizers and coremltools print during one step: their
    step-by-step prints and per-pass progress bars (stdout, stderr), logs up to ERROR (the quantizers
    log every node and install a root handler; torch logs a KeyboardInterrupt that lands inside its
    fake-tensor dispatch as a 300-line ERROR before it propagates, which Ctrl-C must not print) and
    known-benign warnings (coremltools' untested-torch notice). A failure still surfaces as the
    exception. Yields the captured text, which callers attach to the error if the step fails."""
    log = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield log
        finally:
            logging.disable(previous)
