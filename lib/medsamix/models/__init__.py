"""Models: the SAM architecture specs, checkpoint layouts, the pool of models and each model's input preprocessing."""
