"""Which attention logits are the model's own: the two bounds the attention probe and its
numba kernels share (no numba here, so the probe imports them without the kernels).

``NO_WEIGHT``: a key whose logit lies this far below its row's largest gets a softmax weight
under e^-100 (4e-44, below float32's smallest number): it is never attended, as a masked key
is. A mask written as a finite fill (``masked_fill(mask, -1e9)`` in The Annotated
Transformer, HF's additive -10000) leaves its keys among the allowed ones, so the max
|logit| reads only keys within this of their row's largest: the fill is not read as one of
the model's logits. The entropy's normalisation (the log of the keys a query may attend)
leaves out the keys that are both this far below their row's largest and below
-``MASKED_ROW``: a fill's, whose keys the query may not attend, so a padded batch under a
finite fill reads the entropy it has over its real keys. A head whose own logits reach
-1000 and lie 100 nats below its largest has collapsed onto the keys above them, and reads
so over those.

``MASKED_ROW``: a row whose largest allowed logit lies below minus this holds no logit of
the model's: every key of it was masked by a finite fill (a padding query, a sliding window
over padding), and the softmax spreads it evenly whatever the fill; it gives neither a max
nor an entropy. Softmax reads
differences only, so even a genuine row so far below zero carries its instability, if any,
in the rows above it; training runs whose logits passed ~1e4 diverged (Wortsman et al.
2023).
"""

NO_WEIGHT = 100.0
MASKED_ROW = 1e3
