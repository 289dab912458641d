"""Training side: SSD300 model, loss, data pipelines, training/evaluation engine, export."""
