"""The names of token weighting's selectors (which positions the teacher supervises), scores (how much), spaces
(tokens or cluster marginals) and normalisations (what the weighted sum is divided by), each computed by
varkd/weighting.py. Apart and without imports: varkd.config checks methods against them, and weighting imports
config."""

SELECTORS = ("none", "confidence", "entropy", "acceptance", "topk")
REWEIGHTS = ("none", "confidence", "entropy")
SPACES = ("tokens", "clusters")
NORMALIZATIONS = ("weights", "sequences", "positions")
