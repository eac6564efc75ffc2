"""Making QServe checkpoints: round-to-nearest quantization and the writer of QServe's on-disk layout."""
