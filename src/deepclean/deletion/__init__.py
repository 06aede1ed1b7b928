"""A deletion request on a user's own model and data: ``deepclean forget`` / ``deepclean verify``.

- :mod:`deepclean.deletion.api`: :func:`forget` and :func:`verify`, the library calls.
- :mod:`deepclean.deletion.userdata`: the user's data (ImageFolder, ``.npz``, built-in names) and
  the request (indices, paths, JSON, CSV, a class).
- :mod:`deepclean.deletion.usermodel`: the user's architecture (factory specs, torchvision) and
  weights (safetensors, ``.pt`` state dicts).
- :mod:`deepclean.deletion.cli`: the two commands and their output files.
"""

from deepclean.deletion.api import forget, verify

__all__ = ["forget", "verify"]
