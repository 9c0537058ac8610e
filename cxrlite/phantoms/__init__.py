"""Phantom chest radiographs with known findings: sampling and rendering (generator), normal
anatomy (anatomy), findings and devices (findings), the report written from the labels
(reports) and contact sheets (sheet). Tests, the demo and the quality gate use them; the
runtime and the server never do."""
