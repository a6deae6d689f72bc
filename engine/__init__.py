"""The application layer: the flows the scripts share (distillation, PCA learning, evaluation) and their flags."""
