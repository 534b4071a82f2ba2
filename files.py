"""
Writing files so that nothing is lost: a file is written to a temporary name beside it, flushed to disk, then
renamed over the old one, so that a write killed half-way leaves the previous file as it was.

    atomic_write("out/run/history.json", lambda f: json.dump(history, f), "w")
"""

import os


def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file beside path, flushed to disk, then renamed over path: a write killed
    half-way leaves the old file as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
