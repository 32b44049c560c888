"""lmms-eval's own command line (`python -m lmms_eval ARGS`), run as a script (also for `accelerate launch`)."""
import sys

if __name__ == "__main__":
    from lmms_eval.cli.dispatch import main  # what `python -m lmms_eval` runs (lmms_eval/__main__.py)

    sys.argv[0] = "lmms_eval"
    main()
