"""Models of Whiten-MTD: teachers, students, GeM pooling, PCA-whitening, the distillation loss and model."""
