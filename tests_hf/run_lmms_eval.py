"""lmms-eval's own command line (`python -m lmms_eval ARGS`), with the stand-in backend put in place first
if llava_fitprune.adapters.hf is not there (see lmms_stub_backend.py). Also a script for `accelerate launch`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lmms_stub_backend import install_if_missing  # noqa: E402

if __name__ == "__main__":
    install_if_missing()
    from lmms_eval.cli.dispatch import main  # what `python -m lmms_eval` runs (lmms_eval/__main__.py)

    sys.argv[0] = "lmms_eval"
    main()
