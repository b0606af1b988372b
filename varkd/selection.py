"""The names of token weighting's selectors (which positions the teacher supervises) and scores (how much), each
computed by varkd/weighting.py. Apart and without imports: varkd.config checks methods against them, and
weighting imports config."""

SELECTORS = ("none", "confidence", "entropy", "acceptance", "topk")
REWEIGHTS = ("none", "confidence", "entropy")
