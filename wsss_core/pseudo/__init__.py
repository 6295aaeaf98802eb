"""The pseudo-label rules, seed and mask: `seeds` (fusion recipes of the exported class maps,
the seed → label-map rules with a constant or a percentile background) and `masks` (the rules
that turn propagated maps into pseudo masks). Torch-free numpy rules on the models / metrics
floor (tests/test_layers.py); the stages that read and write the map stores call them.

Nothing is re-exported here, so a stage's source fingerprint (wsss_core/codehash.py) follows
only the rule module it imports.
"""
