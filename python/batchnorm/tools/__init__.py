"""The command-line tools apart from the library: ``python -m batchnorm demo`` and ``bench``."""
