"""Judging reports and models: the CheXpert report labeler (labeler; its tables: labeler_rules;
its fast pattern scans: guarded_regex) and labeling report files (label_files), report sections (sections), metrics with bootstrap intervals, findings F1 included
(metrics), findings generation and multiple-choice scoring of a PyTorch model (evaluation), the
quality gate of compressed variants (quality), and `cxrlite eval`'s CheXbench-style evaluation of
a checkpoint or a bundle's variants (chexbench) with its tables and files (results)."""
