"""The C parts of chanstore: the cache's hit path (daemon/chanstore/cache_hits.py), the
proof that a body is a value's stored form (daemon/chanstore/stored_form.py), a
large json file written over its folder's spare (daemon/chanstore/backends/spare_files.py),
a round of Redis commands encoded (daemon/chanstore/backends/redis_rounds.py), and
whether a value is its own JSON shape (daemon/chanstore/json_shape.py).

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
        ),
        Extension(
            "chanstore._stored_form",
            sources=[
                "daemon/chanstore/_stored_form.c",
                "daemon/chanstore/_stored_form_compact.c",
                "daemon/chanstore/_stored_form_beside.c",
            ],
            depends=["daemon/chanstore/_stored_form.h"],
            optional=True,
        ),
        Extension(
            "chanstore._redis_commands",
            sources=["daemon/chanstore/_redis_commands.c"],
            optional=True,
        ),
        Extension(
            "chanstore._json_shape",
            sources=["daemon/chanstore/_json_shape.c"],
            optional=True,
        ),
        Extension(
            "chanstore._spare_files",
            sources=["daemon/chanstore/_spare_files.c"],
            optional=True,
        ),
    ]
)
