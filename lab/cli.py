"""
What the scripts' command lines share: a parser whose errors read like every other error of the lab,
one line on stderr and exit code 2.
"""

import argparse
import os
import tempfile


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_output_folder(folder, name):
    """ValueError (one line) unless folder is, or can be made as, a folder this process can write
    into. Tried with a real temporary file in the deepest folder that exists, so a read-only file
    system or a missing permission shows before any work is done (os.access does not see either for
    root); nothing is created or left behind."""
    path = os.path.abspath(folder)
    parent = path
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        where = '' if parent == path else f" ({parent} is a file)"
        raise ValueError(f"{name}={folder!r} is not a folder{where}; give a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix='.write-test-')
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"{name}={folder!r}: cannot write into {parent} ({e.strerror}); give a folder you can "
                         f"write to") from None
