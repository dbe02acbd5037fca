"""
What the scripts' command lines share: a parser whose errors read like every other error of the lab,
one line on stderr and exit code 2.
"""

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
