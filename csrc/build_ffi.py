"""cffi build script: compiles csrc/*.c into the private module klcrypt._native.

The cdef is read from the C headers listed in CDEF_HEADERS (the same headers the
C files include), so a prototype cannot drift between C and Python.
"""
import glob
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# Order matters: later headers may use types from earlier ones.
CDEF_HEADERS = ["klcrypt.h", "keylocker.h", "plane.h"]


def _cdef_text(path):
    out = []
    for line in open(path):
        s = line.strip()
        if s.startswith("#"):
            # keep '#define NAME <integer>' (cffi understands it); drop the rest
            if not re.match(r"#define\s+\w+\s+-?(0x[0-9a-fA-F]+|\d+)[uUlL]*\b", s):
                continue
            line = re.sub(r"/\*.*?\*/", "", line)
        out.append(line)
    return "".join(out)


ffibuilder = FFI()
for name in CDEF_HEADERS:
    p = os.path.join(HERE, name)
    if os.path.exists(p):
        ffibuilder.cdef(_cdef_text(p))

sources = sorted(glob.glob(os.path.join(HERE, "*.c")))
ffibuilder.set_source(
    "klcrypt._native",
    "\n".join(f'#include "{h}"' for h in CDEF_HEADERS if os.path.exists(os.path.join(HERE, h))),
    sources=[os.path.relpath(s) for s in sources],
    include_dirs=[os.path.relpath(HERE)],
    libraries=["crypto", "pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fno-strict-aliasing", "-D_GNU_SOURCE"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
