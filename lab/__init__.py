"""The lab's library: everything the scripts on top (train.py, probe.py, prepare.py, bench.py) share.
Its modules import model.py and each other, never a script."""
