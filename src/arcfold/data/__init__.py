"""The data contract: the training CSV and its checks, image decoding and the one resize, augmentation,
samplers, and the fold file."""
