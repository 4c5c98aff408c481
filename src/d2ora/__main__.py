"""``python -m d2ora`` is the ``d2ora`` command (torchrun starts peers as ``-m d2ora peer``)."""

from d2ora.cli import app

app()
