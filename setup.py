"""The C part of chanstore: the cache's hit path (see daemon/chanstore/cache_hits.py).

Everything else is declared in pyproject.toml. The extension is optional: where
it cannot be built (no C compiler), the install goes on and chanstore runs the
same code in Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "chanstore._cache_hits",
            sources=["daemon/chanstore/_cache_hits.c"],
            optional=True,
        )
    ]
)
