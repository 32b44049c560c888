"""Small utilities shared across the package; each module has one job.

    atomic.py  write files and folders so a reader never sees half of one (temporary sibling, fsync, rename)
    plots.py   matplotlib helpers behind the PNGs that fit, demo and bench write
    moved.py   import paths that moved in the 0.2 layout fail with one line naming the new path
"""
