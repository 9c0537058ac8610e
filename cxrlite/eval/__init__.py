"""Judging reports and models: the CheXpert report labeler (labeler), report sections
(sections), metrics with bootstrap intervals (metrics), findings generation and multiple-choice
scoring (evaluation), and the quality gate of compressed variants (quality)."""
