"""Synchronised Batch Normalization across processes (issue 13), in progress.

What exists: the statistics exchange's wire format and merge (``_merge``): each
rank packs its shard's per-channel (count, mean as a hi/lo pair, M2) with a
header into one float64 vector for a single all-gather, and every rank merges
the gathered vectors in rank order with Chan's formula in float64, so that all
ranks hold identical bits whatever the transport's reduction order.  The MPI and
NCCL engines and the synchronised forward and backward passes come next; nothing
here is part of the public API yet.
"""
