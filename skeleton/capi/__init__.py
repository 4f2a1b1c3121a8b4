"""The skeleton as C libraries: ``liberpal-skeleton-v{1,2,3}.so``.

``build`` compiles them with cffi's embedding mode from ``glue.c`` (the
exported PAL API of DESIGN.md section 6) and ``entry`` (the Python side each
library runs in its embedded interpreter, around ``skeleton.pal.Pal``).
"""
