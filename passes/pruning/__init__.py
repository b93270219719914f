"""Pruning: structured channel pruning (`prune`), training-free.

Read in this order:
- `prune`: the `prune` pass, its options and the five steps (analyse, score, choose,
  remove, recover);
- `groups`: the channel dependency analysis (which channels must go together);
- `apply`: physical removal of the chosen channels from weights and shape constants;
- `recover`: least-squares refit of the layers that lost inputs, BN re-estimation.
"""
