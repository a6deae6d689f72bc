"""Datasets: GLDv2, revisited Oxford/Paris (+1M), SVD, and the embedded synthetic toy data."""
