"""The errors of array-backend selection, below both ``ddref.backend`` and ``ddref._cupy``.

They live here, not in ``backend``, so that ``_cupy`` (which raises them while loading CuPy)
does not import ``backend`` (which imports ``_cupy`` to select CuPy): no import circle.
``ddref.backend`` re-exports both names.
"""


class BackendUnavailable(RuntimeError):
    """The requested array backend cannot run here; the message names the fix."""


class CupyNotInstalled(BackendUnavailable, ImportError):
    """CuPy is not installed (``pip install "ddref[gpu]"``)."""
