"""Evaluation of both model families, together: ranking (fMRL: full ranking over all items at every nested
size, sharded over the ranks, against most-popular; ``ranking.py``, ``sharded.py``, ``metrics.py``) and
click-through rate (DLRM: exact AUC, log loss, normalised entropy; ``ctr.py``).
"""
